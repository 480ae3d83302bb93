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

Segment (position-independent) reuse, on the `rag` workload only (passages joined by a separator), each
from its own warm-up LLM (the passages, each with its separator) and measured in a fresh one, L1 serving:
- `ours-prefix`: our connector, `segment_reuse` off: exact prefix reuse (the first passage, at most);
- `ours-segment`: `segment_reuse` on, `segment_separator` = the workload's separator ids: every passage,
  wherever it sits, K re-rotated to its new positions (approximate: the cached KV never saw the text now
  before it);
- `ours-segment-norotate`: the same with `segment_rerotate` off (a diagnostic: K keeps its old positions).
With any of them, recompute (when listed) and each of them also run a quality round after the TTFT round
(bench/ttft_quality.py): greedy continuations and the log-likelihood of recompute's continuations.
"""

import gc
import importlib.util
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from bench.ttft_quality import CONTINUATION_TOKENS, continuation_logprobs
from bench.ttft_workloads import Workload

SCENARIOS = ("recompute", "vllm-prefix-cache", "ours-L1", "ours-L2", "ours-L3", "ours-L4", "ours-prefix",
             "ours-segment", "ours-segment-norotate", "example-connector", "example-connector-1step",
             "offloading-connector", "lmcache")
TIERS = ("L1", "L2", "L3", "L4")
TIER_SCENARIOS = tuple(f"ours-{t}" for t in TIERS)
SEGMENT_SCENARIOS = ("ours-prefix", "ours-segment", "ours-segment-norotate")  # rag only, with quality figures
APPROXIMATE = ("ours-segment", "ours-segment-norotate")  # may change the output: quality measured, not failed
WARMUP_TOKENS = 512  # each LLM's own first requests (not the workload's warm-up round)


def default_scenarios(workload: str) -> tuple[str, ...]:
    """What `--scenarios` means when not given: rag compares the segment-reuse scenarios with recompute;
    the other workloads run every scenario but those."""
    if workload == "rag":
        return ("recompute", *SEGMENT_SCENARIOS)
    return tuple(s for s in SCENARIOS if s not in SEGMENT_SCENARIOS)


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
    # Connector statistics per measured request (SEGMENT_SCENARIOS): tokens loaded, and of those, from
    # segment chunks (None: the connector does not report it).
    reused_tokens: list[int | None] = field(default_factory=list)
    segment_tokens: list[int | None] = field(default_factory=list)
    # Quality round (bench/ttft_quality.py), per measured prompt: the greedy continuation, and the logprobs
    # of the reference's (recompute's) continuation under this scenario's cache.
    continuations: list[tuple[int, ...]] = field(default_factory=list)
    ref_logprobs: list[list[float]] = field(default_factory=list)
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
    quality: bool = False  # run the quality round (recompute: it makes the reference)
    reference: list[tuple[int, ...]] | None = None  # recompute's continuations, once measured


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


def _connector_totals(llm) -> dict[str, int]:
    """Our connector's counters since its instances started (connectors/stats.py `totals`), summed over the
    scheduler half and the worker half, both in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group, has_kv_transfer_group

    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    connectors = [getattr(getattr(core, "scheduler", None), "connector", None)]
    if has_kv_transfer_group():
        connectors.append(get_kv_transfer_group())
    totals: dict[str, int] = {}
    for connector in connectors:
        for half in (getattr(connector, "_scheduler", None), getattr(connector, "_worker", None)):
            for name, value in getattr(getattr(half, "stats", None), "totals", {}).items():
                totals[name] = totals.get(name, 0) + value
    return totals


def _warmup(ctx: Context, llm, scenario: str, requests) -> float:
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        ctx.progress.update(scenario, "warm-up", i, len(requests))
        _request(llm, req.tokens)
    ctx.progress.done(f"{scenario} (warm-up)")
    return time.perf_counter() - t0


def _measure(ctx: Context, llm, res: Result, before_each=None, counters=None) -> Result:
    """The TTFT round; `counters` (a callable returning the connector's totals) adds the tokens each request
    loaded, read outside the clock."""
    reqs = ctx.workload.measured
    for i, req in enumerate(reqs):
        ctx.progress.update(res.scenario, "measure", i, len(reqs))
        if before_each is not None:
            before_each()
        before = counters() if counters is not None else None
        elapsed, token, cached = _request(llm, req.tokens)
        res.labels.append(req.label)
        res.ttft_s.append(elapsed)
        res.first_tokens.append(token)
        res.prompt_tokens.append(len(req.tokens))
        res.cached_tokens.append(cached)
        if before is not None:  # None: the connector does not report it (no such statistic, or none found)
            after = counters()
            for name, out in (("loaded_tokens", res.reused_tokens), ("segment_loaded_tokens", res.segment_tokens)):
                out.append(after[name] - before.get(name, 0) if name in after else None)
    ctx.progress.done(res.scenario)
    return res


def _quality(ctx: Context, llm, res: Result) -> Result:
    """The quality round, after the TTFT round and outside its clock: every prompt's greedy continuation,
    then the logprobs of the reference's continuation after it (ctx.reference; None: this scenario's own,
    i.e. this is recompute making the reference). Each is one batched call: the cache is what the warm-up
    and the TTFT round left (every prompt loads as its TTFT request did, or the KV that request stored)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def generate(prompts, params):
        return llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)

    reqs = ctx.workload.measured
    greedy = SamplingParams(max_tokens=CONTINUATION_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    # vLLM turns cache reads off for requests with prompt_logprobs (vllm/sampling_params.py; its scheduler
    # then drops the connector's hit): asked back on, so the score sees this scenario's cache.
    score = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=0,
                           skip_reading_prefix_cache=False)
    ctx.progress.update(res.scenario, "quality", 0, 2)
    res.continuations = [tuple(out.outputs[0].token_ids) for out in generate([r.tokens for r in reqs], greedy)]
    refs = ctx.reference if ctx.reference is not None else res.continuations
    ctx.progress.update(res.scenario, "quality", 1, 2)
    outs = generate([r.tokens + tuple(ref) for r, ref in zip(reqs, refs)], score)
    res.ref_logprobs = [continuation_logprobs(out.prompt_logprobs, ref) for out, ref in zip(outs, refs)]
    ctx.progress.done(f"{res.scenario} (quality)")
    # The continuation is new text: computed under this scenario's cache, never loaded.
    beyond = [r.label for r, out in zip(reqs, outs) if (out.num_cached_tokens or 0) > len(r.tokens)]
    if beyond:
        res.fail(f"the scoring request loaded tokens past the prompt in {len(beyond)} of {len(reqs)} prompts: "
                 "its continuation did not come from this scenario's computation")
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
        _measure(ctx, llm, res)
        return _quality(ctx, llm, res) if ctx.quality else res
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


def _ours_kv(extra: dict):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="LMCacheCoreConnector", kv_role="kv_both",
                            kv_connector_module_path="connectors.vllm_v1", kv_connector_extra_config=extra)


def _ours_warm(ctx: Context, kv, extra: dict, label: str) -> tuple[float, float, list]:
    """The workload's warm-up round in an LLM of its own, closed after: (build_s, warmup_s, cache engines)."""
    llm, build_s = _llm(ctx, kv=kv)
    try:
        t0 = time.perf_counter()
        _warmup(ctx, llm, label, ctx.workload.warmup)
        engines = _engines(extra)
        for engine in engines:
            engine.flush()  # background writes to L3/L4 belong to the warm-up
        warmup_s = time.perf_counter() - t0
    finally:
        _close(llm)
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
    extra = _ours_extra(ctx)
    kv = _ours_kv(extra)
    try:
        build_s, warmup_s, engines = _ours_warm(ctx, kv, extra, "ours")
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


SEGMENT_NOTES = {
    "ours-prefix": "segment_reuse off: exact prefix reuse",
    "ours-segment": "segment_reuse on, K re-rotated: approximate (cached passages never saw the text now before them)",
    "ours-segment-norotate": "segment_reuse on, segment_rerotate off: a diagnostic of what re-rotation is worth",
}


def segment_overrides(scenario: str, separator) -> dict:
    """The connector settings (kv_connector_extra_config) a SEGMENT_SCENARIOS scenario adds to ours-*'s."""
    if scenario == "ours-prefix":
        return {"segment_reuse": False}
    extra = {"segment_reuse": True, "segment_separator": "ids:" + ",".join(str(t) for t in separator)}
    if scenario == "ours-segment-norotate":
        extra["segment_rerotate"] = False
    return extra


def ours_segment(ctx: Context, scenario: str) -> Result:
    """One of SEGMENT_SCENARIOS: its own warm-up LLM, then a fresh LLM for the TTFT round (connector
    statistics per request) and, once recompute made the reference, the quality round."""
    from connectors import registry
    from connectors.spec import load_settings

    if not ctx.workload.separator:
        return skipped(scenario, f"measures the rag workload (passages joined by a separator), not "
                                 f"{ctx.workload.name}: pass --workload rag")
    extra = {**_ours_extra(ctx), **segment_overrides(scenario, ctx.workload.separator)}
    res = Result(scenario, notes=[SEGMENT_NOTES[scenario]])

    def run() -> None:
        load_settings(extra)  # a setting the connector does not know fails here, before any LLM is built
        kv = _ours_kv(extra)
        res.build_s, res.warmup_s, _ = _ours_warm(ctx, kv, extra, scenario)
        llm, build_s = _llm(ctx, kv=kv)
        res.build_s += build_s
        try:
            retrieve0 = _retrieve_seconds()
            _measure(ctx, llm, res, counters=lambda: _connector_totals(llm))
            res.retrieve_s = _retrieve_seconds() - retrieve0
            if ctx.reference is not None:
                _quality(ctx, llm, res)
        finally:
            _close(llm)

    try:
        return _guarded(ctx, res, run)
    finally:
        registry.close_all()
        shutil.rmtree(extra["local_cache_dir"], ignore_errors=True)


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
        return skipped(name, "lmcache is not installed (its vLLM connector needs a GPU: LMCache 0.5.6 installed "
                             "here stops with 'No supported cpu connector found' on vLLM's CPU backend)")
    res = Result(name, notes=["LMCache with its default settings"])
    kv = KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both")
    return _guarded(ctx, res, lambda: _warm_then_measure(ctx, res, ctx.workload.warmup, fresh=True, kv=kv))


def run_all(ctx: Context, scenarios: list[str]) -> list[Result]:
    """Every requested scenario in SCENARIOS order (recompute, the baseline, first when requested)."""
    wanted = [s for s in SCENARIOS if s in scenarios]
    segment_wanted = [s for s in wanted if s in SEGMENT_SCENARIOS]
    ctx.quality = bool(segment_wanted and ctx.workload.separator)  # recompute makes the reference
    results = []
    if "recompute" in wanted:
        results.append(recompute(ctx))
        if ctx.quality and results[-1].status == "ok":
            ctx.reference = results[-1].continuations
    if "vllm-prefix-cache" in wanted:
        results.append(vllm_prefix_cache(ctx))
    ours_wanted = [s for s in wanted if s in TIER_SCENARIOS]
    if ours_wanted:
        results += ours(ctx, ours_wanted)
    for s in segment_wanted:
        results.append(ours_segment(ctx, s))
    for s in ("example-connector", "example-connector-1step"):
        if s in wanted:
            results.append(example_connector(ctx, one_step=s.endswith("1step")))
    if "offloading-connector" in wanted:
        results.append(offloading_connector(ctx))
    if "lmcache" in wanted:
        results.append(lmcache(ctx))
    return results
