"""The command line of `python -m bench.ttft` (the modes and what they report: bench/ttft/__init__.py)."""

import argparse
import json
import os
import signal
import sys
from dataclasses import asdict, replace

from bench.common import Report, emit
from bench.ttft import avalanche, mixed, report as inprocess_report, server_report
from bench.ttft.config import (AVALANCHE_DEFAULTS, DTYPE_BYTES, MIXED_DEFAULTS, MODES, QUICK, RAG_DEFAULTS,
                               RAG_QUICK, SERVER_DEFAULTS, Config)
from bench.ttft.plot import model_name, plot
from bench.ttft.progress import Progress
from bench.ttft.scenarios import SCENARIOS, SEGMENT_SCENARIOS, default_scenarios
from bench.ttft.serving import SERVER_SCENARIOS
from bench.ttft.workloads import REPEAT_MODES, WORKLOADS, build, load_tokenizer, to_text

SERVER_WORKLOADS = ("avalanche", "mixed")  # server mode only; their prompts are long-doc-qa's


def run(cfg: Config) -> Report:
    report = Report("ttft", asdict(cfg))
    progress = Progress()
    if cfg.server:
        from bench.ttft.attached import run_attached

        tokenizer = load_tokenizer(cfg.tokenizer or _server_tokenizer(cfg.model))
        workload = _workload(cfg, tokenizer)
        results = run_attached(cfg.server, cfg.model, workload, lambda t: to_text(tokenizer, t), progress,
                               cfg.timeout_s)
        report.rows = inprocess_report.summarize(results, "server-cold", None, check_first_tokens=False)
        report.notes.append("--server mode: first tokens are not compared (no uncached reference on the server)")
        return report
    from bench.models import smollm2_dir

    model = cfg.model or smollm2_dir()
    workload = _workload(cfg, load_tokenizer(cfg.tokenizer or model))
    if cfg.mode == "inprocess":
        from bench.ttft import inprocess

        return inprocess.run(cfg, model, workload, report, progress)
    from bench.ttft import server_mode

    return server_mode.run(cfg, model, workload, report, progress)


def columns(cfg: Config, rows: list[dict]) -> list[str]:
    if cfg.workload == "avalanche":
        return avalanche.COLUMNS
    if cfg.workload == "mixed":
        return mixed.COLUMNS
    if cfg.mode == "servers" and not cfg.server:
        return server_report.COLUMNS
    return inprocess_report.columns(rows)


def _workload(cfg: Config, tokenizer):
    name = "long-doc-qa" if cfg.workload in SERVER_WORKLOADS else cfg.workload
    return build(name, tokenizer, num_docs=cfg.num_docs, doc_tokens=cfg.doc_tokens, questions=cfg.questions,
                 repeat_mode=cfg.repeat_mode, turn_tokens=cfg.turn_tokens,
                 passages_per_prompt=cfg.passages_per_prompt, seed=cfg.seed, rag_preamble=cfg.rag_preamble)


def _server_tokenizer(model: str | None) -> str:
    """--server: the model's own tokenizer when --model is a local dir, else SmolLM2's (token counts of the
    workload are then approximate; the server's usage reports its own)."""
    if model and os.path.isdir(model):
        return model
    from bench.models import smollm2_dir

    return smollm2_dir()


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    known = dict.fromkeys(SERVER_SCENARIOS + SCENARIOS)
    unknown = [s for s in names if s not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; server mode: {', '.join(SERVER_SCENARIOS)}; "
                                         f"--mode inprocess: {', '.join(SCENARIOS)}")
    return names


def _json_object(text: str) -> tuple[tuple[str, object], ...]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return tuple(sorted(value.items()))


def _defaults(argv: list[str]) -> tuple[Config, str, str]:
    """(the defaults for this command line, its workload, its mode): sizes follow the workload and the mode,
    --quick's too; explicit flags win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workload", choices=WORKLOADS + SERVER_WORKLOADS, default=Config.workload)
    pre.add_argument("--mode", choices=MODES, default=None)
    pre.add_argument("--server", default=None)
    known = pre.parse_known_args(argv)[0]
    mode = known.mode or ("inprocess" if known.workload == "rag" else "servers")
    quick = "--quick" in argv
    if known.workload == "rag":
        sizes = RAG_QUICK if quick else RAG_DEFAULTS
    elif quick:
        sizes = QUICK
    elif known.workload in SERVER_WORKLOADS:
        sizes = AVALANCHE_DEFAULTS if known.workload == "avalanche" else MIXED_DEFAULTS
    elif mode == "servers" and not known.server:
        sizes = SERVER_DEFAULTS
    else:
        sizes = {}
    return replace(Config(), mode=mode, **sizes), known.workload, mode


def parse_config(argv) -> Config:
    """The command line as a Config."""
    import bench.ttft

    argv = list(argv)
    d, workload, mode = _defaults(argv)
    p = argparse.ArgumentParser(prog="python -m bench.ttft", description=bench.ttft.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=WORKLOADS + SERVER_WORKLOADS, default=d.workload)
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="servers (default): vLLM servers this run starts; inprocess: vLLM in this process "
                        "(--workload rag's only mode)")
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
                   help=f"comma-separated. Server mode, of (default all): {', '.join(SERVER_SCENARIOS)}. "
                        f"--mode inprocess, of: {', '.join(SCENARIOS)} (default: all but "
                        f"{', '.join(SEGMENT_SCENARIOS)}; --workload rag: {','.join(default_scenarios('rag'))})")
    p.add_argument("--model", default=None, help="local HF checkpoint dir or a name vLLM resolves (server: its name)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPE_BYTES))
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="our chunk size (a multiple of 128 on CPU)")
    p.add_argument("--batched-tokens", type=int, default=None, help="vLLM max_num_batched_tokens")
    p.add_argument("--remote-url", default=None, help="L4 for ours-L4, e.g. redis-cluster://127.0.0.1:7000,...")
    p.add_argument("--ours-config", type=_json_object, default=(), metavar="JSON",
                   help='settings of our connector (kv_connector_extra_config), e.g. \'{"codec": "none"}\'')
    p.add_argument("--server", default=None, help="drive an already running OpenAI-compatible server at this URL")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per request")
    p.add_argument("--start-timeout-s", type=float, default=d.start_timeout_s, help="per server start")
    p.add_argument("--log-dir", default=None, help="servers' logs (default: beside --output, else a temp dir)")
    p.add_argument("--avalanche-requests", type=int, default=d.avalanche_requests)
    p.add_argument("--decoders", type=int, default=d.decoders, help="mixed: requests decoding meanwhile")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens, help="mixed: tokens each decoder streams")
    p.add_argument("--compare", type=_json_object, nargs="+", default=d.compare, metavar="JSON",
                   help="mixed: connector settings to compare, e.g. '{\"async_load\": false}' '{\"async_load\": true}'")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="1 document of 512 tokens, 2 questions (rag: 4 passages "
                   "of 300 tokens, 1 prompt each); explicit sizes still apply")
    p.add_argument("--output", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here (needs matplotlib)")
    args = vars(p.parse_args(argv))
    args.pop("quick")
    args["compare"] = tuple(args["compare"])
    if args["server"] and not args["model"]:
        p.error("--server needs --model: the model name the server serves")
    if workload == "rag" and mode == "servers":
        p.error("--workload rag runs in process only (--mode inprocess)")
    if workload in SERVER_WORKLOADS and mode != "servers":
        p.error(f"--workload {workload} runs against servers only (--mode servers)")
    return Config(**args)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # every server this run started is stopped on the way out


def main(argv=None) -> Report:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    if cfg.mode == "servers" and not cfg.server:
        signal.signal(signal.SIGTERM, _interrupt)
    report = run(cfg)
    model = report.config.get("model") or cfg.model
    report.config["model_name"] = model_name(model)
    if cfg.plot and cfg.workload in SERVER_WORKLOADS:
        report.notes.append(f"plot: --workload {cfg.workload} has no TTFT chart; {cfg.plot} not written")
    elif cfg.plot:
        title = f"{cfg.workload}: {cfg.num_docs} x {cfg.doc_tokens} tokens, {report.config['model_name']} {cfg.dtype}"
        report.notes.append(plot(report.rows, cfg.plot, title))
    emit(report, columns(cfg, report.rows), cfg.output)
    return report
