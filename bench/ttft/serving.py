"""`bench.ttft`'s server mode (the default): real vLLM OpenAI servers it starts itself (bench/ttft/servers.py),
as users run them (scheduler and worker in processes of their own), one streamed request at a time, the
workload's token ids as prompts, greedy, max_tokens 1. Rows, all in one run:

- `recompute`: server `plain` (no connector, vLLM's prefix cache on), the prefix cache reset before each
  request (outside the clock): every prompt computed. The baseline, and the first-token reference.
- `vllm-prefix-cache`: the same server after a warm-up round: vLLM's own prefix-cache hit.
- `vllm-prefix-cache@ours`: server `ours` (our connector: L1 + L2 + L3 in a temporary directory, + L4 with
  --remote-url, vLLM's prefix cache on) after its warm-up round: vLLM's hit in the process that serves
  ours-L2, the reference of the targets (same process = fair comparison).
- `ours-L2`: the same server, vLLM's prefix cache reset before each request (`reset_external=false`): our
  L1/L2 serve.
- `ours-L3`: server `ours` restarted with the same settings (memory empty, disk warm); vLLM's prefix cache
  and our memory tiers reset before each request (`reset_external=true`).
- `ours-L4`: server `ours-redis`, a second server whose connector has L1, L2 and the Redis at --remote-url
  only (no disk): it must serve the documents `ours` wrote through to Redis; reset as ours-L3.
Each row scrapes /metrics before and after (bench/ttft/metrics.py). The chunks the measured prompts add are
few when --doc-tokens is a multiple of --chunk-size (the question is shorter than a chunk).
"""

import os
import time

from bench.ttft import metrics
from bench.ttft.client import reset_prefix_cache, stream_completion
from bench.ttft.results import Result, skipped
from bench.ttft.server_plan import TOKEN_IDS, Plan
from bench.ttft.servers import ServerError, error_summary
from bench.ttft.sizing import distinct_chunks

SERVER_SCENARIOS = ("recompute", "vllm-prefix-cache", "vllm-prefix-cache@ours", "ours-L2", "ours-L3", "ours-L4")
REFERENCE = "vllm-prefix-cache@ours"  # the server-mode targets' reference (else vllm-prefix-cache)
RESET_RETRIES = 20  # reset_prefix_cache answers false while blocks are held: retried 50 ms apart


def _reset(server, external: bool, outcomes: list[bool]) -> None:
    for _ in range(RESET_RETRIES):
        if reset_prefix_cache(server.url, external):
            outcomes.append(True)
            return
        time.sleep(0.05)
    outcomes.append(False)


def _send(plan: Plan, server, tokens, max_tokens: int = 1):
    try:
        return stream_completion(server.url, plan.model, list(tokens), plan.request_timeout_s, max_tokens=max_tokens,
                                 extra=TOKEN_IDS)
    except (OSError, RuntimeError):
        server.check_alive()  # a dead server says why (its log's tail); else the client's error stands
        raise


def warm(plan: Plan, server, workload, label: str) -> float:
    """The workload's warm-up round (timed apart); seconds."""
    t0 = time.perf_counter()
    for i, req in enumerate(workload.warmup):
        plan.progress.update(label, "warm-up", i, len(workload.warmup))
        _send(plan, server, req.tokens)
    plan.progress.done(f"{label} (warm-up)")
    return time.perf_counter() - t0


def measure(plan: Plan, server, name: str, workload, reset: bool | None = None) -> Result:
    """The measured round on `server`; `reset` None: nothing between requests, else reset_prefix_cache
    (reset_external=`reset`) before each, outside the clock."""
    res = Result(name, server_log=server.log_path, build_s=server.start_s)
    outcomes: list[bool] = []
    before = metrics.scrape(server.url)
    for i, req in enumerate(workload.measured):
        plan.progress.update(name, "measure", i, len(workload.measured))
        if reset is not None:
            _reset(server, reset, outcomes)
        c = _send(plan, server, req.tokens)
        res.labels.append(req.label)
        res.ttft_s.append(c.ttft_s)
        res.first_tokens.append(c.first_token if c.first_token is not None else c.text)
        res.prompt_tokens.append(c.prompt_tokens or len(req.tokens))
        res.cached_tokens.append(c.cached_tokens)
    res.metrics = metrics.deltas(before, metrics.settled(server.url, before, len(workload.measured)))
    plan.progress.done(name)
    if reset is not None:
        what = "vLLM's prefix cache and the connector's memory tiers" if reset else "vLLM's prefix cache"
        res.notes.append(f"{what} reset before each request (success {sum(outcomes)} of {len(outcomes)}"
                         + ("; vLLM also answers success for a connector without reset_cache" if reset else "")
                         + ")")
    return res


def _l3_files(path: str) -> int:
    return sum(name.endswith(".lmc") for _, _, names in os.walk(path) for name in names)


def wait_for_disk(plan: Plan, workload, deadline_s: float = 60.0) -> str | None:
    """Wait until L3 holds every chunk of the warm-up (written in the background); a note if it did not."""
    want = distinct_chunks(workload.warmup, plan.chunk_size)
    end = time.monotonic() + deadline_s
    while _l3_files(plan.l3_dir) < want and time.monotonic() < end:
        time.sleep(0.2)
    got = _l3_files(plan.l3_dir)
    return None if got >= want else f"L3 held {got} of the warm-up's {want} chunks when the server was restarted"


def _failed(names, e: Exception) -> list[Result]:
    return [Result(n).fail(error_summary(e)) for n in names]


def run_servers(plan: Plan, workload, scenarios) -> list[Result]:
    """Every requested row of SERVER_SCENARIOS, in that order; a server that fails costs its rows."""
    wanted = [s for s in SERVER_SCENARIOS if s in scenarios]
    out: dict[str, Result] = {}
    plain = [s for s in ("recompute", "vllm-prefix-cache") if s in wanted]
    if plain:
        try:
            with plan.running("plain", plan.spec(prefix_caching=True)) as server:
                if "recompute" in plain:
                    out["recompute"] = measure(plan, server, "recompute", workload, reset=False)
                if "vllm-prefix-cache" in plain:
                    warmup_s = warm(plan, server, workload, "plain")
                    out["vllm-prefix-cache"] = measure(plan, server, "vllm-prefix-cache", workload)
                    out["vllm-prefix-cache"].warmup_s = warmup_s
        except (ServerError, OSError, RuntimeError) as e:
            out.update((r.scenario, r) for r in _failed([s for s in plain if s not in out], e))
    out.update((r.scenario, r) for r in _ours(plan, workload, wanted))
    if "ours-L4" in wanted:
        out["ours-L4"] = _ours_l4(plan, workload)
    return [out[s] for s in wanted]


def _ours(plan: Plan, workload, wanted) -> list[Result]:
    names = [s for s in ("vllm-prefix-cache@ours", "ours-L2", "ours-L3") if s in wanted]
    if not names and not ("ours-L4" in wanted and plan.remote_url):  # ours-L4 reads what this server writes
        return []
    extra, out = plan.ours_extra(), {}
    try:
        with plan.running("ours", plan.spec(connector=extra)) as server:
            warmup_s = warm(plan, server, workload, "ours")
            if "vllm-prefix-cache@ours" in names:
                out["vllm-prefix-cache@ours"] = measure(plan, server, "vllm-prefix-cache@ours", workload)
            if "ours-L2" in names:
                out["ours-L2"] = measure(plan, server, "ours-L2", workload, reset=False)
            for r in out.values():
                r.warmup_s = warmup_s
            disk_note = wait_for_disk(plan, workload)
        if "ours-L3" in names:
            with plan.running("ours-restarted", plan.spec(connector=extra)) as server:
                out["ours-L3"] = measure(plan, server, "ours-L3", workload, reset=True)
                out["ours-L3"].notes += [f"server restarted with the same settings (L3 {plan.l3_dir})",
                                         *filter(None, [disk_note])]
    except (ServerError, OSError, RuntimeError) as e:
        out.update((r.scenario, r) for r in _failed([s for s in names if s not in out], e))
    return list(out.values())


def _ours_l4(plan: Plan, workload) -> Result:
    if not plan.remote_url:
        return skipped("ours-L4", "needs --remote-url (redis://H:P or redis-cluster://H:P,...): the server `ours` "
                                  "writes through to it and a second server reads it")
    try:
        with plan.running("ours-redis", plan.spec(connector=plan.ours_extra(disk=False))) as server:
            res = measure(plan, server, "ours-L4", workload, reset=True)
    except (ServerError, OSError, RuntimeError) as e:
        return _failed(["ours-L4"], e)[0]
    res.notes.append("a second server (L1, L2 and Redis, no disk) loading what `ours` wrote to Redis")
    return res
