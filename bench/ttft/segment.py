"""Segment (position-independent) reuse scenarios of `bench.ttft`, on the `rag` workload only (passages
joined by a separator), each in an LLM of its own: the warm-up round (the passages, each with its separator),
then the measured round, L1 serving:
- `ours-prefix`: our connector, `segment_reuse` off: exact prefix reuse (the first passage, at most);
- `ours-segment`: `segment_reuse` on, `segment_separator` = the workload's separator ids: every passage,
  wherever it sits, K re-rotated to its new positions (approximate: the cached KV never saw the text now
  before it);
- `ours-segment-norotate`: the same with `segment_rerotate` off (a diagnostic: K keeps its old positions).
With any of them, recompute (when listed) and each of them also run a quality round after the TTFT round
(bench/ttft/quality.py): greedy continuations and the log-likelihood of recompute's continuations.
"""

import shutil

from bench.ttft.harness import Context, build_llm, close_llm, connector_totals, guarded, measure, quality_round
from bench.ttft.ours import ours_extra, ours_kv, ours_warm, retrieve_seconds
from bench.ttft.results import Result, skipped

SEGMENT_SCENARIOS = ("ours-prefix", "ours-segment", "ours-segment-norotate")  # rag only, with quality figures
APPROXIMATE = ("ours-segment", "ours-segment-norotate")  # may change the output: quality measured, not failed

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
    """One of SEGMENT_SCENARIOS in an LLM of its own: the warm-up round, the TTFT round (connector statistics
    per request) and, once recompute made the reference, the quality round."""
    from connectors.settings import load_settings

    if not ctx.workload.separator:
        return skipped(scenario, f"measures the rag workload (passages joined by a separator), not "
                                 f"{ctx.workload.name}: pass --workload rag")
    extra = {**ours_extra(ctx), **segment_overrides(scenario, ctx.workload.separator)}
    res = Result(scenario, notes=[SEGMENT_NOTES[scenario]])

    def run() -> None:
        load_settings(extra)  # a setting the connector does not know fails here, before any LLM is built
        llm, res.build_s = build_llm(ctx, kv=ours_kv(extra))
        try:
            res.warmup_s = ours_warm(ctx, llm, scenario)
            retrieve0 = retrieve_seconds()
            measure(ctx, llm, res, counters=lambda: connector_totals(llm))
            res.retrieve_s = retrieve_seconds() - retrieve0
            if ctx.reference is not None:
                quality_round(ctx, llm, res)
        finally:
            close_llm(llm)

    try:
        return guarded(ctx, res, run)
    finally:
        shutil.rmtree(extra["local_cache_dir"], ignore_errors=True)
