"""The command line of `python -m bench.ttft` (the modes and what they report: bench/ttft/__init__.py)."""

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

from bench.common import Report, emit
from bench.ttft.config import DTYPE_BYTES, QUICK, RAG_DEFAULTS, RAG_QUICK, Config
from bench.ttft.plot import model_name, plot
from bench.ttft.progress import Progress
from bench.ttft.report import columns, summarize
from bench.ttft.scenarios import SCENARIOS, SEGMENT_SCENARIOS, default_scenarios
from bench.ttft.workloads import REPEAT_MODES, WORKLOADS, build, load_tokenizer, to_text


def run(cfg: Config) -> Report:
    report = Report("ttft", asdict(cfg))
    progress = Progress()
    if cfg.server:
        from bench.ttft.client import run_server

        tokenizer = load_tokenizer(cfg.tokenizer or _server_tokenizer(cfg.model))
        workload = _workload(cfg, tokenizer)
        results = run_server(cfg.server, cfg.model, workload, lambda t: to_text(tokenizer, t), progress, cfg.timeout_s)
        report.rows = summarize(results, "server-cold", None, check_first_tokens=False)
        report.notes.append("server mode: first tokens are not compared (no uncached reference on the server)")
        return report
    from bench.models import smollm2_dir
    from bench.ttft import inprocess

    model = cfg.model or smollm2_dir()
    workload = _workload(cfg, load_tokenizer(cfg.tokenizer or model))
    return inprocess.run(cfg, model, workload, report, progress)


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
    import bench.ttft

    p = argparse.ArgumentParser(prog="python -m bench.ttft", description=bench.ttft.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    model = report.config.get("model") or cfg.model
    report.config["model_name"] = model_name(model)
    if cfg.plot:
        title = f"{cfg.workload}: {cfg.num_docs} x {cfg.doc_tokens} tokens, {report.config['model_name']} {cfg.dtype}"
        report.notes.append(plot(report.rows, cfg.plot, title))
    emit(report, columns(report.rows), cfg.output)
    return report
