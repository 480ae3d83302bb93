"""Server mode of `bench.ttft`: the workload against a running OpenAI-compatible server (e.g. `vllm serve`
with our connector on a GPU box), streaming, one request at a time, standard library only.

TTFT = from sending the request to the first server-sent event that carries generated text (or a finish
reason): what a client of that server waits. Rows:
- `server-cold`: every prompt starts with a line of its own (a random nonce), so neither the server's prefix
  cache nor ours can match anything: the recompute baseline, on the same server, in the same run;
- `server-warm`: after a warm-up round of the workload's warm-up prompts (timed apart).
Hit rate: `usage.prompt_tokens_details.cached_tokens` / `usage.prompt_tokens` when the server reports them
(vLLM: `--enable-prompt-tokens-details`); else unknown.
"""

import http.client
import json
import time
import uuid
from urllib.parse import urlsplit

from bench.ttft.results import Result


def stream_completion(url: str, model: str, prompt: str, timeout: float,
                      clock=time.perf_counter) -> tuple[float, str, dict]:
    """(seconds to the first streamed token, its text, the usage record or {}) for one completion. `clock`
    is read when the request goes out and when the first token arrives."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname, parts.port, timeout=timeout)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}})
    path = parts.path.rstrip("/") + "/v1/completions"
    try:
        t0 = clock()
        conn.request("POST", path, body, {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{url}{path}: HTTP {resp.status}: {resp.read(500).decode(errors='replace')}")
        ttft, text, usage = None, "", {}
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or ():
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if ttft is None and (piece or choice.get("finish_reason")):
                    ttft, text = clock() - t0, piece
            usage = event.get("usage") or usage
        if ttft is None:
            raise RuntimeError(f"{url}{path}: the stream ended without a token")
        return ttft, text, usage
    finally:
        conn.close()


def _measure(name: str, url: str, model: str, prompts, progress, timeout: float) -> Result:
    res = Result(name)
    for i, (label, text, n_tokens) in enumerate(prompts):
        progress.update(name, "measure", i, len(prompts))
        ttft, first, usage = stream_completion(url, model, text, timeout)
        details = usage.get("prompt_tokens_details") or {}
        res.labels.append(label)
        res.ttft_s.append(ttft)
        res.first_tokens.append(first)
        res.prompt_tokens.append(usage.get("prompt_tokens") or n_tokens)
        res.cached_tokens.append(details.get("cached_tokens"))
    progress.done(name)
    return res


def run_server(url: str, model: str, workload, to_text, progress, timeout: float) -> list[Result]:
    """server-cold and server-warm rows for `workload` (token prompts, sent as text via `to_text`)."""
    measured = [(r.label, to_text(r.tokens), len(r.tokens)) for r in workload.measured]
    cold = [(label, f"[{uuid.uuid4().hex}]\n{text}", n) for label, text, n in measured]
    results = [_measure("server-cold", url, model, cold, progress, timeout)]
    t0 = time.perf_counter()
    for i, req in enumerate(workload.warmup):
        progress.update("server (warm-up)", "warm-up", i, len(workload.warmup))
        stream_completion(url, model, to_text(req.tokens), timeout)
    warmup_s = time.perf_counter() - t0
    progress.done("server (warm-up)")
    warm = _measure("server-warm", url, model, measured, progress, timeout)
    warm.warmup_s = warmup_s
    results.append(warm)
    return results
