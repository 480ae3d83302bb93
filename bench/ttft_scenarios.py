"""The scenarios of `bench.ttft`, measured on vLLM in this process, one request at a time.

TTFT of a request = wall time of `llm.generate([prompt], max_tokens=1)`: scheduling, our lookup and load
(or vLLM's prefix-cache match), the prefill and the first token's sampling. Each LLM first serves two
requests of its own (first-call overheads, in `build_s`), and each scenario's warm-up round is
timed apart (`warmup_s`). vLLM's prefix caching is off except in `vllm-prefix-cache`.

- `recompute`: no connector: the baseline every ratio is taken against, and the first-token reference.
  Left out of `--scenarios` (it takes ~45 s a request at 8k tokens on 2 cores), there are no ratios and
  the first scenario measured is the first-token reference.
- `vllm-prefix-cache`: vLLM's own cache, warm-up and measurement in one LLM (the in-memory best case).
- `ours-L1..L4`: LMCacheCoreConnector; the warm-up round runs in one LLM, the measurement in a fresh one.
  Before each measured request every tier above the named one is emptied (outside the clock), so loads
  come from that tier; per-tier hit counts are reported to show it (a lower-tier hit is promoted, so the
  copy out may be counted again in L1). Chunks a pass stores are deleted before the next pass, so every
  pass starts from the warm-up's cache state.
- `example-connector`: vLLM's ExampleConnector (disk), same prefill step as the others;
  `example-connector-1step`: the same with the whole prompt in one prefill step (it stores only the first
  step's KV of a longer prompt). It reuses whole prompts only: its warm-up round is the measured prompts.
- `offloading-connector`: vLLM's OffloadingConnector (CPU offload), warm-up and measurement in one LLM.
- `lmcache`: LMCache's LMCacheConnectorV1, when the `lmcache` package is importable.
"""

import gc
import importlib.util
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from bench.ttft_workloads import Workload

SCENARIOS = ("recompute", "vllm-prefix-cache", "ours-L1", "ours-L2", "ours-L3", "ours-L4", "example-connector",
             "example-connector-1step", "offloading-connector", "lmcache")
TIERS = ("L1", "L2", "L3", "L4")
WARMUP_TOKENS = 512  # each LLM's own first requests (not the workload's warm-up round)


@dataclass
class Result:
    scenario: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    labels: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    first_tokens: list[int | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int | None] = field(default_factory=list)  # tokens not computed by the request
    build_s: float | None = None
    warmup_s: float | None = None
    tier_hits: dict[str, int] | None = None  # ours: chunk reads per tier during the measurement
    tier_read_bytes: dict[str, int] | None = None
    retrieve_s: float | None = None  # ours: engine time in retrieve (lookups, reads, decode)
    notes: list[str] = field(default_factory=list)

    def fail(self, why: str) -> "Result":
        self.status, self.reason = "failed", why
        return self


def skipped(scenario: str, why: str) -> Result:
    return Result(scenario, "skipped", why)


@dataclass
class Context:
    model: str
    workload: Workload
    dtype: str
    max_model_len: int
    chunk_size: int
    kv_bytes_per_token: int
    cache_bytes: int  # room for every chunk of the run, per memory tier
    progress: object
    batched_tokens: int | None = None
    remote_url: str | None = None
    ours_config: dict = field(default_factory=dict)  # CacheConfig overrides for ours-*
    step_tokens: int | None = None  # the prefill step vLLM chose, once an LLM was built


# -- vLLM plumbing --------------------------------------------------------------------------------------------

def _llm(ctx: Context, *, kv=None, prefix_caching: bool = False, batched_tokens: int | None = None):
    from vllm import LLM

    kwargs = {"model": ctx.model, "skip_tokenizer_init": True, "enforce_eager": True, "dtype": ctx.dtype, "seed": 0,
              "max_model_len": ctx.max_model_len, "enable_prefix_caching": prefix_caching, "kv_transfer_config": kv}
    batched_tokens = batched_tokens or ctx.batched_tokens
    if batched_tokens:
        kwargs["max_num_batched_tokens"] = batched_tokens
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    # First-call costs out of every figure: a cold prompt, then the same prompt extended (a cache hit where
    # there is a cache). Reversed text: it shares no prefix with the workload.
    dummy = ctx.workload.measured[0].tokens[::-1][:WARMUP_TOKENS + 16]
    _request(llm, dummy[:-16])
    _request(llm, dummy)
    return llm, time.perf_counter() - t0


def _close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        gc.collect()


def _request(llm, tokens) -> tuple[float, int | None, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=list(tokens))], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - t0
    ids = out.outputs[0].token_ids
    return elapsed, (ids[0] if ids else None), out.num_cached_tokens or 0


def _warmup(ctx: Context, llm, scenario: str, requests) -> float:
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        ctx.progress.update(scenario, "warm-up", i, len(requests))
        _request(llm, req.tokens)
    ctx.progress.done(f"{scenario} (warm-up)")
    return time.perf_counter() - t0


def _measure(ctx: Context, llm, res: Result, before_each=None) -> Result:
    reqs = ctx.workload.measured
    for i, req in enumerate(reqs):
        ctx.progress.update(res.scenario, "measure", i, len(reqs))
        if before_each is not None:
            before_each()
        elapsed, token, cached = _request(llm, req.tokens)
        res.labels.append(req.label)
        res.ttft_s.append(elapsed)
        res.first_tokens.append(token)
        res.prompt_tokens.append(len(req.tokens))
        res.cached_tokens.append(cached)
    ctx.progress.done(res.scenario)
    return res


def _guarded(ctx: Context, res: Result, fn) -> Result:
    """Run fn(); an exception marks the scenario failed with its message (fn closes what it built)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (a peer that crashes is a result to report, not a crash of the run)
        text = str(e).strip().splitlines()
        res.fail(f"{type(e).__name__}: {text[-1] if text else ''}"[:300])
        ctx.progress.done(res.scenario)
    return res


# -- scenarios ------------------------------------------------------------------------------------------------

def recompute(ctx: Context) -> Result:
    res = Result("recompute")
    llm, res.build_s = _llm(ctx)
    try:
        ctx.step_tokens = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        return _measure(ctx, llm, res)
    finally:
        _close(llm)


def _warm_then_measure(ctx: Context, res: Result, warmup, *, fresh: bool, **llm_args) -> Result:
    """Warm-up round, then the measured round in the same LLM, or in a fresh one (`fresh`)."""
    llm, res.build_s = _llm(ctx, **llm_args)
    try:
        res.warmup_s = _warmup(ctx, llm, res.scenario, warmup)
        if fresh:
            _close(llm)
            llm = None
            llm, build_s = _llm(ctx, **llm_args)
            res.build_s += build_s
        return _measure(ctx, llm, res)
    finally:
        if llm is not None:
            _close(llm)


def vllm_prefix_cache(ctx: Context) -> Result:
    return _warm_then_measure(ctx, Result("vllm-prefix-cache"), ctx.workload.warmup, fresh=False,
                              prefix_caching=True)


def _ours_extra(ctx: Context) -> dict:
    extra = {"chunk_size": ctx.chunk_size, "max_device_cache_size": f"{ctx.cache_bytes}B",
             "max_local_cpu_size": f"{ctx.cache_bytes}B", "local_cache_dir": tempfile.mkdtemp(prefix="ttft-l3-"),
             "cache_salt": f"bench-ttft-{uuid.uuid4().hex[:12]}"}  # a run never sees an earlier run's chunks
    if ctx.remote_url:
        extra.update(remote_url=ctx.remote_url, remote_ttl=3600.0)  # our entries leave the server within an hour
    return {**extra, **ctx.ours_config}


def _engines(extra: dict):
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


def _retrieve_seconds() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("lmcache_op_seconds_sum", {"op": "retrieve"}) or 0.0


def ours(ctx: Context, wanted: list[str]) -> list[Result]:
    """ours-L1..L4 from one warm-up: tiers L1 + L2 + L3 (+ L4 with a remote URL), one measurement LLM."""
    from vllm.config import KVTransferConfig

    from connectors import registry

    results = {s: None for s in wanted}
    if "ours-L4" in results and not ctx.remote_url:
        results["ours-L4"] = skipped("ours-L4", "needs --remote-url (redis://H:P or redis-cluster://H:P,...)")
    todo = [s for s, r in results.items() if r is None]
    if not todo:
        return list(results.values())
    extra = _ours_extra(ctx)
    kv = KVTransferConfig(kv_connector="LMCacheCoreConnector", kv_role="kv_both",
                          kv_connector_module_path="connectors.vllm_v1", kv_connector_extra_config=extra)
    try:
        llm, build_s = _llm(ctx, kv=kv)
        try:
            t0 = time.perf_counter()
            _warmup(ctx, llm, "ours", ctx.workload.warmup)
            engines = _engines(extra)
            for engine in engines:
                engine.flush()  # background writes to L3/L4 belong to the warm-up
            warmup_s = time.perf_counter() - t0
        finally:
            _close(llm)
        if not engines:
            raise RuntimeError("no cache engine with the benchmark's settings in this process (the connector "
                               "must run in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        warm_keys = {k for e in engines for r in ctx.workload.warmup for k in e.keys(r.tokens)}
        llm, build2_s = _llm(ctx, kv=kv)
        try:
            for scenario in sorted(todo, key=lambda s: TIERS.index(s[-2:])):
                res = Result(scenario, build_s=build_s + build2_s, warmup_s=warmup_s)
                results[scenario] = _ours_pass(ctx, llm, res, engines, warm_keys)
        finally:
            _close(llm)
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

    before, retrieve0 = _tier_counters(engines), _retrieve_seconds()
    _measure(ctx, llm, res, before_each=empty_upper_tiers)
    after = _tier_counters(engines)
    res.retrieve_s = _retrieve_seconds() - retrieve0
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


def example_connector(ctx: Context, one_step: bool) -> Result:
    from vllm.config import KVTransferConfig

    name = "example-connector-1step" if one_step else "example-connector"
    longest, step = ctx.workload.longest, ctx.step_tokens
    if one_step and step and step >= longest:
        return skipped(name, f"every prompt fits in one prefill step ({step} tokens): same as example-connector")
    res = Result(name, notes=["warm-up = the measured prompts (it reuses whole prompts only)"])
    path = tempfile.mkdtemp(prefix="ttft-example-")
    kv = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                          kv_connector_extra_config={"shared_storage_path": path})
    try:
        _guarded(ctx, res, lambda: _warm_then_measure(ctx, res, ctx.workload.measured, fresh=True, kv=kv,
                                                      batched_tokens=max(longest, step or 0) if one_step else None))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if res.status == "failed" and step and longest > step and not one_step:
        res.reason += f" (prompts up to {longest} tokens, prefill step {step})"
    return res


def offloading_connector(ctx: Context) -> Result:
    from vllm.config import KVTransferConfig
    from vllm.platforms import current_platform

    name = "offloading-connector"
    if not (current_platform.is_cuda_alike() or current_platform.is_xpu()):
        return skipped(name, f"vLLM's CPU offloading needs a CUDA-alike or XPU GPU; it raises at start-up on "
                             f"{current_platform.device_type!r} (vllm/v1/kv_offload/cpu/spec.py)")
    res = Result(name, notes=["warm-up and measurement in one LLM (its CPU store lives in the instance)"])
    kv = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                          kv_connector_extra_config={"cpu_bytes_to_use": ctx.cache_bytes})
    return _guarded(ctx, res, lambda: _warm_then_measure(ctx, res, ctx.workload.warmup, fresh=False, kv=kv))


def lmcache(ctx: Context) -> Result:
    from vllm.config import KVTransferConfig

    name = "lmcache"
    if importlib.util.find_spec("lmcache") is None:
        return skipped(name, "lmcache is not installed (pip install lmcache: CUDA only, not on this CPU machine)")
    res = Result(name, notes=["LMCache with its default settings"])
    kv = KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both")
    return _guarded(ctx, res, lambda: _warm_then_measure(ctx, res, ctx.workload.warmup, fresh=True, kv=kv))


def run_all(ctx: Context, scenarios: list[str]) -> list[Result]:
    """Every requested scenario in SCENARIOS order (recompute, the baseline, first when requested)."""
    wanted = [s for s in SCENARIOS if s in scenarios]
    results = [recompute(ctx)] if "recompute" in wanted else []
    if "vllm-prefix-cache" in wanted:
        results.append(vllm_prefix_cache(ctx))
    ours_wanted = [s for s in wanted if s.startswith("ours-")]
    if ours_wanted:
        results += ours(ctx, ours_wanted)
    if ctx.workload.name == "rag":
        results.append(skipped("ours-segment", "segment reuse (every passage at any position) is not implemented "
                                               "in the connector yet (issue 8); ours-L* show prefix reuse"))
    for s in ("example-connector", "example-connector-1step"):
        if s in wanted:
            results.append(example_connector(ctx, one_step=s.endswith("1step")))
    if "offloading-connector" in wanted:
        results.append(offloading_connector(ctx))
    if "lmcache" in wanted:
        results.append(lmcache(ctx))
    return results
