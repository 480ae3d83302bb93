"""`ours-L1..L4` in process: LMCacheCoreConnector, the warm-up round in one LLM, the measurement in a fresh
one. Before each measured request every tier above the named one is emptied (outside the clock), so loads
come from that tier; per-tier hit counts are reported to show it (a lower-tier hit is promoted, so the copy
out may be counted again in L1). Chunks a pass stores are deleted before the next pass, so every pass starts
from the warm-up's cache state. Also the connector plumbing the segment scenarios share.
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


def engines_for(extra: dict):
    """The cache engines in this process built from `extra`'s settings."""
    from connectors import registry
    from connectors.spec import load_settings

    want = load_settings(extra).cache
    return [e for e in registry.engines() if e.config == want]


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


def ours_warm(ctx: Context, kv, extra: dict, label: str) -> tuple[float, float, list]:
    """The workload's warm-up round in an LLM of its own, closed after: (build_s, warmup_s, cache engines)."""
    llm, build_s = build_llm(ctx, kv=kv)
    try:
        t0 = time.perf_counter()
        warmup(ctx, llm, label, ctx.workload.warmup)
        engines = engines_for(extra)
        for engine in engines:
            engine.flush()  # background writes to L3/L4 belong to the warm-up
        warmup_s = time.perf_counter() - t0
    finally:
        close_llm(llm)
    if not engines:
        raise RuntimeError("no cache engine with the benchmark's settings in this process (the connector "
                           "must run in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return build_s, warmup_s, engines


def ours(ctx: Context, wanted: list[str]) -> list[Result]:
    """ours-L1..L4 from one warm-up: tiers L1 + L2 + L3 (+ L4 with a remote URL), one measurement LLM."""
    from connectors import registry

    results = {s: None for s in wanted}
    if "ours-L4" in results and not ctx.remote_url:
        results["ours-L4"] = skipped("ours-L4", "needs --remote-url (redis://H:P or redis-cluster://H:P,...)")
    todo = [s for s, r in results.items() if r is None]
    if not todo:
        return list(results.values())
    extra = ours_extra(ctx)
    kv = ours_kv(extra)
    try:
        build_s, warmup_s, engines = ours_warm(ctx, kv, extra, "ours")
        warm_keys = {k for e in engines for r in ctx.workload.warmup for k in e.keys(r.tokens)}
        llm, build2_s = build_llm(ctx, kv=kv)
        try:
            for scenario in sorted(todo, key=lambda s: TIERS.index(s[-2:])):
                res = Result(scenario, build_s=build_s + build2_s, warmup_s=warmup_s)
                results[scenario] = _ours_pass(ctx, llm, res, engines, warm_keys)
        finally:
            close_llm(llm)
    finally:
        registry.close_all()
        shutil.rmtree(extra["local_cache_dir"], ignore_errors=True)
    return list(results.values())


def _ours_pass(ctx: Context, llm, res: Result, engines, warm_keys) -> Result:
    tier = res.scenario[-2:]
    above = TIERS[: TIERS.index(tier)]

    def empty_upper_tiers():
        for engine in engines:
            engine.flush()
            for t in engine.tiers.tiers:
                if t.name in above:
                    t.clear()

    before, retrieve0 = _tier_counters(engines), retrieve_seconds()
    measure(ctx, llm, res, before_each=empty_upper_tiers)
    after = _tier_counters(engines)
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
    for engine in engines:  # the next pass starts from the warm-up's state: drop what this pass stored
        engine.flush()
        new = {k for r in ctx.workload.measured for k in engine.keys(r.tokens)} - warm_keys
        engine.tiers.delete(list(new))
    return res
