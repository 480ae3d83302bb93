"""`--workload mixed` of `bench.ttft`: requests decoding while new long requests arrive whose prefix our
cache holds on disk (L3, after a server restart) or in Redis (L4, a second server), for each connector
setting of `--compare` (JSON objects merged into our kv_connector_extra_config, e.g.
`--compare '{"async_load": false}' '{"async_load": true}'`: the harness passes whatever it is given).

Once: server `mixed-warm` (the first setting; L1, L2, L3 in this run's directory, L4 at --remote-url) runs
the warm-up round (the documents) and stops. Then per setting: server `mixed-L3-<i>` (same directory and
salt: memory empty, disk warm) and, with --remote-url, `mixed-L4-<i>` (L1, L2 and Redis only). On each:
`--decoders` requests stream `--decode-tokens` tokens each (short prompts of their own, EOS ignored); once
every one has its first tokens, one new request per document (its first question, max_tokens 1) goes out,
one after another. Reported per row: the new requests' TTFT, and the decoders' inter-token gaps that
overlap the loads' window (from the first new request to the last one's first token): p50, p99, max, beside
the gaps before it. A new request's first token must equal the first setting's on the same tier.
"""

import json
import statistics
import threading
import time

from bench.ttft import metrics
from bench.ttft.client import stream_completion
from bench.ttft.server_plan import TOKEN_IDS, Plan
from bench.ttft.servers import ServerError, error_summary
from bench.ttft.serving import wait_for_disk, warm

COLUMNS = ["setting", "tier", "status", "new_requests", "new_ttft_p50_s", "new_ttft_max_s", "itl_p50_ms",
           "itl_p99_ms", "itl_max_ms", "itl_before_p50_ms", "hit_rate", "loaded_tok", "note"]
DECODER_PROMPT_TOKENS = 64
FIRST_TOKENS = 4  # each decoder streams this many before the new requests go out


def decoder_prompts(workload, k: int) -> list[list[int]]:
    """k short prompts sharing no prefix with the documents (their text reversed, cut at k offsets)."""
    text = [t for r in workload.warmup for t in r.tokens][::-1]
    step = max(1, (len(text) - DECODER_PROMPT_TOKENS) // max(k, 1))
    return [text[i * step: i * step + DECODER_PROMPT_TOKENS] for i in range(k)]


def first_per_document(workload) -> list:
    """The first measured request of each warm-up document (a second one would hit vLLM's own cache)."""
    out = []
    for doc in workload.warmup:
        req = next((r for r in workload.measured if r.tokens[: len(doc.tokens)] == doc.tokens), None)
        if req is not None:
            out.append(req)
    return out


def gaps(times: list[float], start: float, end: float) -> tuple[list[float], list[float]]:
    """(gaps between consecutive times that overlap [start, end], gaps that end before start)."""
    during, before = [], []
    for a, b in zip(times, times[1:]):
        if b <= start:
            before.append(b - a)
        elif a < end:
            during.append(b - a)
    return during, before


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def mixed_round(plan: Plan, server, news, decoders: list[list[int]], decode_tokens: int) -> dict:
    """Decoders streaming, then the new requests one by one; the row's figures."""
    counts, streams, errors = [0] * len(decoders), [None] * len(decoders), []
    ready = threading.Condition()

    def decode(i: int) -> None:
        def seen(n: int) -> None:
            with ready:
                counts[i] = n
                ready.notify_all()
        try:
            streams[i] = stream_completion(server.url, plan.model, decoders[i], plan.request_timeout_s,
                                           max_tokens=decode_tokens, extra={**TOKEN_IDS, "ignore_eos": True},
                                           on_token=seen)
        except (OSError, RuntimeError) as e:
            errors.append(f"decoder {i}: {type(e).__name__}: {e}"[:300])
            seen(decode_tokens)  # let the round go on; the row fails below

    threads = [threading.Thread(target=decode, args=(i,), daemon=True) for i in range(len(decoders))]
    before = metrics.scrape(server.url)
    for t in threads:
        t.start()
    with ready:
        ready.wait_for(lambda: min(counts) >= FIRST_TOKENS, timeout=plan.request_timeout_s)
    start, ttfts, cached, prompt, firsts = time.perf_counter(), [], [], [], []
    for req in news:
        c = stream_completion(server.url, plan.model, list(req.tokens), plan.request_timeout_s, extra=TOKEN_IDS)
        ttfts.append(c.ttft_s)
        cached.append(c.cached_tokens or 0)
        prompt.append(c.prompt_tokens or len(req.tokens))
        firsts.append(c.first_token)
    end = time.perf_counter()
    for t in threads:
        t.join(plan.request_timeout_s)
    delta = metrics.deltas(before, metrics.settled(server.url, before, len(news) + len(decoders)))
    row = {"status": "ok", "new_requests": len(news), "new_ttft_s": ttfts, "first_tokens": firsts,
           "new_ttft_p50_s": statistics.median(ttfts), "new_ttft_max_s": max(ttfts),
           "hit_rate": sum(cached) / sum(prompt), "loaded_tok": delta["loaded_tok"], "metrics": delta, "notes": []}
    if errors:
        return {**row, "status": "failed", "reason": errors[0]}
    during, earlier = [], []
    for c in streams:
        d, b = gaps([c.sent_at + t for t in c.token_times], start, end)
        during += d
        earlier += b
        if c.sent_at + c.token_times[-1] < end:
            row["notes"].append("a decoder finished before the loads ended: raise --decode-tokens")
    if during:
        row.update(itl_p50_ms=1e3 * _p(during, 0.5), itl_p99_ms=1e3 * _p(during, 0.99), itl_max_ms=1e3 * max(during))
    if earlier:
        row["itl_before_p50_ms"] = 1e3 * _p(earlier, 0.5)
    row["notes"] = sorted(set(row["notes"]))
    return row


def run_mixed(plan: Plan, workload, compare: list[dict], decoders: int, decode_tokens: int):
    """(rows, notes): a row per setting and tier."""
    news, prompts = first_per_document(workload), decoder_prompts(workload, decoders)
    rows: list[dict] = []
    try:
        with plan.running("mixed-warm", plan.spec(connector=plan.ours_extra(**compare[0]))) as server:
            warm(plan, server, workload, "mixed")
            disk_note = wait_for_disk(plan, workload)
    except (ServerError, OSError, RuntimeError) as e:
        return [{"setting": "warm-up", "tier": "", "status": "failed", "note": error_summary(e)}], []
    tiers = [("L3", {})] + ([("L4", {"disk": False})] if plan.remote_url else [])
    for i, setting in enumerate(compare):
        for tier, where in tiers:
            label = json.dumps(setting, sort_keys=True)
            name = f"mixed-{tier}-{i}"
            plan.progress.update(f"{tier} {label}"[:24], "mixed", 0, 1)
            try:
                with plan.running(name, plan.spec(connector=plan.ours_extra(**where, **setting))) as server:
                    row = mixed_round(plan, server, news, prompts, decode_tokens)
            except (ServerError, OSError, RuntimeError) as e:
                row = {"status": "failed", "reason": error_summary(e), "notes": []}
            plan.progress.done(f"{tier} {label}"[:24])
            rows.append({"setting": label, "tier": tier, "server_log": plan.started[-1].log_path, **row})
    for row in rows:
        ref = next(r for r in rows if r["tier"] == row["tier"])
        if row["status"] == "ok" and ref["status"] == "ok" and row["first_tokens"] != ref["first_tokens"]:
            row.update(status="failed", reason=f"first tokens differ from {ref['setting']}'s on {row['tier']}")
        row["note"] = "; ".join(filter(None, [row.get("reason"), *row.get("notes", [])]))
    notes = [f"mixed: {decoders} decoders x {decode_tokens} tokens; {len(news)} new requests of "
             f"{max(len(r.tokens) for r in news)} tokens at most, one after another", *filter(None, [disk_note])]
    if not plan.remote_url:
        notes.append("mixed: L4 rows need --remote-url")
    return rows, notes + compare_notes(rows)


def compare_notes(rows: list[dict]) -> list[str]:
    """Each later setting against the first on the same tier: the longest decode gap during the loads (issue
    #16's target: at most half) and the new requests' TTFT (at most 1.2x)."""
    notes = []
    for row in rows:
        ref = next(r for r in rows if r["tier"] == row["tier"])
        if row is ref or not (row.get("itl_max_ms") and ref.get("itl_max_ms")):
            continue
        gap, ttft = row["itl_max_ms"] / ref["itl_max_ms"], row["new_ttft_p50_s"] / ref["new_ttft_p50_s"]
        notes.append(f"mixed {row['tier']}: {row['setting']} vs {ref['setting']}: longest decode gap "
                     f"{row['itl_max_ms']:.0f} vs {ref['itl_max_ms']:.0f} ms ({gap:.2f}x; target <= 0.5x), new-request "
                     f"TTFT p50 {row['new_ttft_p50_s']:.3g} vs {ref['new_ttft_p50_s']:.3g} s ({ttft:.2f}x; target <= 1.2x)")
    return notes
