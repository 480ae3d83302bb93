"""The scenarios of `bench.ttft`'s in-process mode (harness: bench/ttft/harness.py), one request at a time.
vLLM's prefix caching is off except in `vllm-prefix-cache`.

- `recompute`: no connector: the baseline every ratio is taken against, and the first-token reference.
  Left out of `--scenarios` (it takes ~45 s a request at 8k tokens on 2 cores), there are no ratios and
  the first scenario measured is the first-token reference.
- `vllm-prefix-cache`: vLLM's own cache, warm-up and measurement in one LLM (the in-memory best case).
- `ours-L1..L4`: our connector, loads from the named tier (bench/ttft/ours.py).
- `ours-prefix`, `ours-segment`, `ours-segment-norotate`: segment reuse, rag only (bench/ttft/segment.py).
- `example-connector`, `example-connector-1step`, `offloading-connector`, `lmcache`: other connectors
  (bench/ttft/peers.py).
"""

from bench.ttft.harness import Context, build_llm, close_llm, measure, quality_round, warm_then_measure
from bench.ttft.ours import TIER_SCENARIOS, ours
from bench.ttft.peers import example_connector, lmcache, offloading_connector
from bench.ttft.results import Result
from bench.ttft.segment import SEGMENT_SCENARIOS, ours_segment

SCENARIOS = ("recompute", "vllm-prefix-cache", "ours-L1", "ours-L2", "ours-L3", "ours-L4", "ours-prefix",
             "ours-segment", "ours-segment-norotate", "example-connector", "example-connector-1step",
             "offloading-connector", "lmcache")


def default_scenarios(workload: str) -> tuple[str, ...]:
    """What `--scenarios` means when not given: rag compares the segment-reuse scenarios with recompute;
    the other workloads run every scenario but those."""
    if workload == "rag":
        return ("recompute", *SEGMENT_SCENARIOS)
    return tuple(s for s in SCENARIOS if s not in SEGMENT_SCENARIOS)


def recompute(ctx: Context) -> Result:
    res = Result("recompute")
    llm, res.build_s = build_llm(ctx)
    try:
        ctx.step_tokens = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        measure(ctx, llm, res)
        return quality_round(ctx, llm, res) if ctx.quality else res
    finally:
        close_llm(llm)


def vllm_prefix_cache(ctx: Context) -> Result:
    return warm_then_measure(ctx, Result("vllm-prefix-cache"), ctx.workload.warmup, fresh=False,
                             prefix_caching=True)


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
