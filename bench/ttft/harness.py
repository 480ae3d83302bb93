"""The in-process harness of `bench.ttft`: vLLM's `LLM` in this process, one request at a time.

TTFT of a request = wall time of `llm.generate([prompt], max_tokens=1)`: scheduling, our lookup and load
(or vLLM's prefix-cache match), the prefill and the first token's sampling. Each LLM first serves two
requests of its own (first-call overheads, in `build_s`), and each scenario's warm-up round is timed apart
(`warmup_s`). The scenarios built on it: bench/ttft/scenarios.py.
"""

import gc
import time
from dataclasses import dataclass, field

from bench.ttft.quality import CONTINUATION_TOKENS, continuation_logprobs
from bench.ttft.results import Result
from bench.ttft.workloads import Workload

WARMUP_TOKENS = 512  # each LLM's own first requests (not the workload's warm-up round)


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


def build_llm(ctx: Context, *, kv=None, prefix_caching: bool = False, batched_tokens: int | None = None):
    """(LLM, seconds to build it and serve its first two requests)."""
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
    request(llm, dummy[:-16])
    request(llm, dummy)
    return llm, time.perf_counter() - t0


def close_llm(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        gc.collect()


def request(llm, tokens) -> tuple[float, int | None, int]:
    """(seconds, first token, prompt tokens vLLM did not compute) of one greedy one-token request."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=list(tokens))], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - t0
    ids = out.outputs[0].token_ids
    return elapsed, (ids[0] if ids else None), out.num_cached_tokens or 0


def connector_totals(llm) -> dict[str, int]:
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


def warmup(ctx: Context, llm, scenario: str, requests) -> float:
    t0 = time.perf_counter()
    for i, req in enumerate(requests):
        ctx.progress.update(scenario, "warm-up", i, len(requests))
        request(llm, req.tokens)
    ctx.progress.done(f"{scenario} (warm-up)")
    return time.perf_counter() - t0


def measure(ctx: Context, llm, res: Result, before_each=None, counters=None) -> Result:
    """The TTFT round; `counters` (a callable returning the connector's totals) adds the tokens each request
    loaded, read outside the clock."""
    reqs = ctx.workload.measured
    for i, req in enumerate(reqs):
        ctx.progress.update(res.scenario, "measure", i, len(reqs))
        if before_each is not None:
            before_each()
        before = counters() if counters is not None else None
        elapsed, token, cached = request(llm, req.tokens)
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


def quality_round(ctx: Context, llm, res: Result) -> Result:
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


def guarded(ctx: Context, res: Result, fn) -> Result:
    """Run fn(); an exception marks the scenario failed with its message (fn closes what it built)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (a peer that crashes is a result to report, not a crash of the run)
        text = str(e).strip().splitlines()
        res.fail(f"{type(e).__name__}: {text[-1] if text else ''}"[:300])
        ctx.progress.done(res.scenario)
    return res


def warm_then_measure(ctx: Context, res: Result, requests, *, fresh: bool, **llm_args) -> Result:
    """Warm-up round, then the measured round in the same LLM, or in a fresh one (`fresh`)."""
    llm, res.build_s = build_llm(ctx, **llm_args)
    try:
        res.warmup_s = warmup(ctx, llm, res.scenario, requests)
        if fresh:
            close_llm(llm)
            llm = None
            llm, build_s = build_llm(ctx, **llm_args)
            res.build_s += build_s
        return measure(ctx, llm, res)
    finally:
        if llm is not None:
            close_llm(llm)
