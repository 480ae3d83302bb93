"""`ours-L1..L4` in process: LMCacheCoreConnector, the warm-up round and every measured pass in one LLM
(vLLM's prefix cache off, so what is reused comes from ours; the worker owns its cache engine, so a fresh LLM
would start with empty memory tiers). Before each measured request every tier above the named one is
emptied (outside the clock), so loads come from that tier; per-tier hit counts are reported to show it (a
lower-tier hit is promoted, so the copy out may be counted again in L1). Chunks a pass stores are deleted
before the next pass, so every pass starts from the warm-up's cache state. Also the connector plumbing the
segment scenarios share.
"""

import shutil
import tempfile
import time
import uuid

from bench.ttft.harness import Context, build_llm, close_llm, measure, warmup
from bench.ttft.results import Result, skipped

TIERS = ("L1", "L2", "L3", "L4")
TIER_SCENARIOS = tuple(f"ours-{t}" for t in TIERS)


def ours_extra(ctx: Context) -> dict:
    """Our connector's kv_connector_extra_config for this run: every tier sized for the run, a fresh L3
    directory and cache salt."""
    extra = {"chunk_size": ctx.chunk_size, "max_device_cache_size": f"{ctx.cache_bytes}B",
             "max_local_cpu_size": f"{ctx.cache_bytes}B", "local_cache_dir": tempfile.mkdtemp(prefix="ttft-l3-"),
             "cache_salt": f"bench-ttft-{uuid.uuid4().hex[:12]}"}  # a run never sees an earlier run's chunks
    if ctx.remote_url:
        extra.update(remote_url=ctx.remote_url, remote_ttl=3600.0)  # our entries leave the server within an hour
    return {**extra, **ctx.ours_config}


def worker_half():
    """Our connector's worker half in this process (in-process engine core, TP=1): it owns the cache engine."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

    worker = getattr(get_kv_transfer_group(), "_worker", None)
    if worker is None or worker.engine is None:
        raise RuntimeError("no cache engine of our connector's worker in this process (the connector must run "
                           "in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return worker


def flush_worker() -> None:
    """Every save of the steps so far is in the worker's engine and written to its disk and Redis tiers."""
    worker = worker_half()
    worker.rank.saver.flush()
    worker.engine.flush()


def _tier_counters(engines) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for engine in engines:
        for name, s in engine.stats().items():
            hits, nbytes = out.get(name, (0, 0))
            out[name] = (hits + s["hits"], nbytes + s["bytes_read"])
    return out


def retrieve_seconds() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("lmcache_op_seconds_sum", {"op": "retrieve"}) or 0.0


def ours_kv(extra: dict):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="LMCacheCoreConnector", kv_role="kv_both",
                            kv_connector_module_path="connectors.vllm_v1", kv_connector_extra_config=extra)


def ours_warm(ctx: Context, llm, label: str) -> float:
    """The workload's warm-up round in `llm`, its saves flushed: seconds."""
    t0 = time.perf_counter()
    warmup(ctx, llm, label, ctx.workload.warmup)
    flush_worker()  # background writes to L3/L4 belong to the warm-up
    return time.perf_counter() - t0


def ours(ctx: Context, wanted: list[str]) -> list[Result]:
    """ours-L1..L4 from one warm-up: tiers L1 + L2 + L3 (+ L4 with a remote URL), one LLM."""
    results = {s: None for s in wanted}
    if "ours-L4" in results and not ctx.remote_url:
        results["ours-L4"] = skipped("ours-L4", "needs --remote-url (redis://H:P or redis-cluster://H:P,...)")
    todo = [s for s, r in results.items() if r is None]
    if not todo:
        return list(results.values())
    extra = ours_extra(ctx)
    try:
        llm, build_s = build_llm(ctx, kv=ours_kv(extra))
        try:
            warmup_s = ours_warm(ctx, llm, "ours")
            engine = worker_half().engine
            warm_keys = {k for r in ctx.workload.warmup for k in engine.keys(r.tokens)}
            for scenario in sorted(todo, key=lambda s: TIERS.index(s[-2:])):
                res = Result(scenario, build_s=build_s, warmup_s=warmup_s)
                results[scenario] = _ours_pass(ctx, llm, res, engine, warm_keys)
        finally:
            close_llm(llm)
    finally:
        shutil.rmtree(extra["local_cache_dir"], ignore_errors=True)
    return list(results.values())


def _ours_pass(ctx: Context, llm, res: Result, engine, warm_keys) -> Result:
    tier = res.scenario[-2:]
    above = TIERS[: TIERS.index(tier)]

    def empty_upper_tiers():
        flush_worker()
        for t in engine.tiers.tiers:
            if t.name in above:
                t.clear()

    before, retrieve0 = _tier_counters([engine]), retrieve_seconds()
    measure(ctx, llm, res, before_each=empty_upper_tiers)
    after = _tier_counters([engine])
    res.retrieve_s = retrieve_seconds() - retrieve0
    res.tier_hits = {n: after[n][0] - before.get(n, (0, 0))[0] for n in after}
    res.tier_read_bytes = {n: after[n][1] - before.get(n, (0, 0))[1] for n in after}
    if tier not in res.tier_hits:
        return res.fail(f"the engine has no {tier} tier")
    served = [n for n, h in res.tier_hits.items() if h]
    if served and max(served, key=TIERS.index) != tier:
        res.notes.append(f"loads came from {max(served, key=TIERS.index)}, not {tier}")
    if above:
        res.notes.append(f"{', '.join(above)} emptied before each request")
    flush_worker()  # the next pass starts from the warm-up's state: drop what this pass stored
    new = {k for r in ctx.workload.measured for k in engine.keys(r.tokens)} - warm_keys
    engine.tiers.delete(list(new))
    return res
