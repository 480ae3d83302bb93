"""HTTP client of `bench.ttft` for OpenAI-compatible servers (vLLM's), standard library only.

`stream_completion`: one streamed completion; TTFT = from sending the request to the first server-sent event
that carries generated text, token ids or a finish reason (what a client of that server waits), and the
arrival time of every later event that carries tokens (inter-token latency). Prompts are text, or token ids
(vLLM takes a list of ints as `prompt`: the server computes exactly the tokens the workload built).
`reset_prefix_cache`: vLLM's development endpoint (the server needs VLLM_SERVER_DEV_MODE=1).
"""

import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Completion:
    ttft_s: float
    text: str  # the first event's text
    first_token: int | None  # the first token's id, where the server sends ids (vLLM: return_token_ids)
    token_times: list[float] = field(default_factory=list)  # seconds from the request to each event with tokens
    usage: dict = field(default_factory=dict)
    sent_at: float = 0.0  # the clock's reading when the request went out

    @property
    def prompt_tokens(self) -> int | None:
        return self.usage.get("prompt_tokens")

    @property
    def cached_tokens(self) -> int | None:
        return (self.usage.get("prompt_tokens_details") or {}).get("cached_tokens")


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"server url: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return cls(parts.hostname, parts.port, timeout=timeout), parts.path.rstrip("/")


def request(method: str, url: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """(HTTP status, body) of one request; OSError when the server cannot be reached."""
    conn, base = _connection(url, timeout)
    try:
        payload = json.dumps(body) if body is not None else None
        conn.request(method, base + path, payload, {"Content-Type": "application/json"} if payload else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get(url: str, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    return request("GET", url, path, timeout=timeout)


def reset_prefix_cache(url: str, external: bool, timeout: float = 60.0) -> bool:
    """POST /reset_prefix_cache: vLLM's prefix cache, and with `external` the connector's cache too. The
    server's answer: False while blocks are still held (running requests)."""
    path = f"/reset_prefix_cache?reset_external={'true' if external else 'false'}"
    status, body = request("POST", url, path, timeout=timeout)
    if status == 404:
        raise RuntimeError(f"{url}{path}: HTTP 404: start the server with VLLM_SERVER_DEV_MODE=1")
    if status != 200:
        raise RuntimeError(f"{url}{path}: HTTP {status}: {body[:300].decode(errors='replace')}")
    return bool(json.loads(body).get("success"))


def stream_completion(url: str, model: str, prompt: str | list[int], timeout: float, *, max_tokens: int = 1,
                      extra: dict | None = None, clock=time.perf_counter, on_token=None) -> Completion:
    """One greedy streamed completion. `extra` goes into the request body (e.g. vLLM's return_token_ids,
    ignore_eos, cache_salt); `clock` is read when the request goes out and as each event with tokens
    arrives; `on_token(events so far)` is called after each such event."""
    conn, base = _connection(url, timeout)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "stream_options": {"include_usage": True}, **(extra or {})})
    path = base + "/v1/completions"
    try:
        t0 = clock()
        conn.request("POST", path, body, {"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{url}{path}: HTTP {resp.status}: {resp.read(500).decode(errors='replace')}")
        out: Completion | None = None
        usage: dict = {}
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
                ids = choice.get("token_ids") or []
                if not (piece or ids or choice.get("finish_reason")):
                    continue
                now = clock() - t0
                if out is None:
                    out = Completion(now, piece, ids[0] if ids else None, sent_at=t0)
                if piece or ids:
                    out.token_times.append(now)
                    if on_token is not None:
                        on_token(len(out.token_times))
            usage = event.get("usage") or usage
        if out is None:
            raise RuntimeError(f"{url}{path}: the stream ended without a token")
        out.usage = usage
        return out
    finally:
        conn.close()
