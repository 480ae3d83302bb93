"""The rows of `bench.ttft`'s report, from the scenarios' results.

Per scenario: TTFT mean/p50/p90 (s), speed-up over `recompute` (median over median: on a shared machine the
mean takes every scheduling hiccup; none when `--scenarios` leaves recompute out), hit rate (prompt tokens
the request did not compute, i.e. took from a cache / prompt tokens), MB of KV loaded into vLLM's cache and
load GB/s (ours: those bytes / the engine's retrieve time, which includes the scatter into vLLM's blocks),
tier hits (ours), and a first-token check: a scenario whose greedy first token differs from recompute's (or,
without recompute, the first scenario's) for any request is marked failed (float32); the approximate
scenarios (ours-segment*) only report it, their quality columns say what changed.

`--workload rag` adds per scenario: `reused_tok`, tokens the connector loaded per prompt (mean; its
`loaded_tokens` statistic), `segment_tok` (of those, from segment chunks), `x_prefix` (reused_tok over
ours-prefix's), and the quality figures of bench/ttft/quality.py against recompute: `agree`, `agree_tok`,
`nll` and `ppl_ratio`. A scenario whose connector loaded fewer tokens than vLLM took from it (so vLLM
attended to KV that was never written) is marked failed.
"""

import statistics

from bench.ttft.quality import quality_figures
from bench.ttft.results import Result
from bench.ttft.segment import APPROXIMATE

COLUMNS = ["scenario", "status", "requests", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "speedup", "pct_of_base",
           "hit_rate", "loaded_MB", "load_GBps", "tier_hits", "warmup_s", "note"]
REUSE_COLUMNS = ["reused_tok", "segment_tok", "x_prefix", "agree", "agree_tok", "nll", "ppl_ratio"]


def _stats(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else xs * 9
    return statistics.fmean(xs), statistics.median(xs), q[8]


def summarize(results: list[Result], base_name: str, kv_bytes_per_token: int | None,
              check_first_tokens: bool = True) -> list[dict]:
    """Rows per result; ratios against `base_name`, first tokens against it (without it: no ratios, and the
    first scenario that measured anything is the first-token reference)."""
    base = next((r for r in results if r.scenario == base_name), None)
    base_p50 = statistics.median(base.ttft_s) if base is not None and base.ttft_s else None
    if base is None:
        base = next((r for r in results if r.ttft_s), None)
        base_name = base.scenario if base is not None else base_name
    rows = []
    for r in results:
        row = {"scenario": r.scenario, "status": r.status, "reason": r.reason, "requests": len(r.ttft_s)}
        if r.ttft_s:
            mean, p50, p90 = _stats(r.ttft_s)
            cached = [c for c in r.cached_tokens if c is not None]
            loaded = sum(cached) if r.scenario.startswith(("ours-", "example-", "offloading-", "lmcache")) else None
            row.update(ttft_mean_s=mean, ttft_p50_s=p50, ttft_p90_s=p90,
                       speedup=base_p50 / p50 if base_p50 else None,
                       pct_of_base=100 * p50 / base_p50 if base_p50 else None,
                       hit_rate=sum(cached) / sum(r.prompt_tokens) if cached else None,
                       warmup_s=r.warmup_s, build_s=r.build_s)
            if loaded is not None and kv_bytes_per_token:
                row["loaded_MB"] = loaded * kv_bytes_per_token / 1e6
                if r.retrieve_s:
                    row["load_GBps"] = loaded * kv_bytes_per_token / r.retrieve_s / 1e9
            if r.tier_hits is not None:
                row["tier_hits"] = " ".join(f"{n}:{h}" for n, h in sorted(r.tier_hits.items()))
                row["tier_read_MB"] = {n: b / 1e6 for n, b in r.tier_read_bytes.items()}
            if check_first_tokens and base is not None:
                wrong = [lab for lab, got, ref in zip(r.labels, r.first_tokens, base.first_tokens) if got != ref]
                row["first_token_mismatches"] = wrong
                if wrong and r.scenario in APPROXIMATE:
                    r.notes.append(f"first token differs from {base_name}'s in {len(wrong)} of {len(r.ttft_s)} "
                                   "requests (approximate reuse: see the quality columns)")
                elif wrong and r.status == "ok":
                    r.fail(f"first token differs from {base_name}'s in {len(wrong)} of {len(r.ttft_s)} requests")
                    row.update(status=r.status, reason=r.reason)
            row.update(_reuse_figures(r, base if base is not None and base.scenario == "recompute" else None),
                       status=r.status, reason=r.reason)
        row["notes"] = r.notes
        row["note"] = "; ".join(filter(None, [row["reason"], *r.notes]))  # the table's last column
        row.update(labels=r.labels, ttft_s=r.ttft_s, prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens,
                   first_tokens=r.first_tokens)
        rows.append(row)
    prefix = next((row for row in rows if row["scenario"] == "ours-prefix" and row.get("reused_tok")), None)
    for row in rows:
        if prefix is not None and row.get("reused_tok") is not None:
            row["x_prefix"] = row["reused_tok"] / prefix["reused_tok"]
    return rows


def _reuse_figures(r: Result, reference: Result | None) -> dict:
    """Tokens reused per prompt (the connector's statistics; recompute: 0) and the quality figures against
    `reference` (recompute's result), where this run measured them."""
    out: dict = {}
    if r.scenario == "recompute" and r.continuations:
        out["reused_tok"] = 0.0
    elif r.reused_tokens and None not in r.reused_tokens:
        out["reused_tok"] = statistics.fmean(r.reused_tokens)
        loaded, skipped_ = sum(r.reused_tokens), sum(r.cached_tokens)
        if loaded < skipped_ and r.status == "ok":  # vLLM did not compute KV that never arrived
            r.fail(f"vLLM took {skipped_} prompt tokens from the connector, which loaded {loaded} "
                   "(its loaded_tokens statistic): the rest of that KV was never written")
        elif loaded != skipped_:
            r.notes.append(f"the connector loaded {loaded} tokens, vLLM took {skipped_} from it")
    elif r.reused_tokens:
        out["reused_tok"] = statistics.fmean(r.cached_tokens)
        r.notes.append("the connector's loaded_tokens statistic was not found: tokens reused = vLLM's cached tokens")
    known = [t for t in r.segment_tokens if t is not None]
    if known:
        out["segment_tok"] = statistics.fmean(known)
    elif r.segment_tokens and r.scenario in APPROXIMATE:
        r.notes.append("the connector reports no segment_loaded_tokens statistic")
    if reference is not None and reference.continuations and len(r.continuations) == len(reference.continuations):
        out.update(quality_figures(reference.continuations, reference.ref_logprobs, r.continuations,
                                   r.ref_logprobs))
    return out


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS, with REUSE_COLUMNS before the note where a row has any of them."""
    extra = [c for c in REUSE_COLUMNS if any(r.get(c) is not None for r in rows)]
    return COLUMNS[:-1] + extra + COLUMNS[-1:]
