"""`bench.ttft`'s HTTP client (bench/ttft/client.py), its `--server URL` mode (bench/ttft/attached.py) and
the /metrics parser (bench/ttft/metrics.py), against a stub OpenAI server.

The stub is a real HTTP server on 127.0.0.1 that streams server-sent events in a known order, so the
client's behaviour (where its TTFT clock stops, which prompts it sends, what it parses) is checked without
timing anything. The client against real vLLM servers: test_ttft_server_mode.py.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from bench.models import smollm2_dir
from bench.ttft import metrics
from bench.ttft.client import reset_prefix_cache, stream_completion


class _StubServer(BaseHTTPRequestHandler):
    """POST /v1/completions, stream=true: `max_tokens` token events (text " yes", token id 7 + i), then
    (once `gate` is open, when one is set) the end and the usage event. cached_tokens: the longest earlier
    prompt this one starts with, as the server's prefix cache would report it (4 characters a token).
    `sent` counts the events written so far. POST /reset_prefix_cache: 404, as a server without
    VLLM_SERVER_DEV_MODE answers."""

    seen: ClassVar[list[str]] = []
    sent: ClassVar[list[int]] = [0]
    gate: ClassVar[threading.Event | None] = None
    gate_timed_out: ClassVar[list[bool]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.startswith("/reset_prefix_cache"):
            self.send_response(404)
            self.end_headers()
            return
        assert self.path == "/v1/completions" and body["stream"] and body["temperature"] == 0, (self.path, body)
        prompt = body["prompt"]
        match = max((len(p) for p in self.seen if prompt.startswith(p)), default=0)
        self.seen.append(prompt)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        ids = body.get("return_token_ids")
        for i in range(body["max_tokens"]):
            self._event({"choices": [{"index": 0, "text": " yes", "finish_reason": None,
                                      **({"token_ids": [7 + i]} if ids else {})}]})
            if i == 0 and self.gate is not None:  # the rest waits until the client stopped its TTFT clock
                self.gate_timed_out.append(not self.gate.wait(30))
        self._event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        n = len(prompt) // 4
        self._event({"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": body["max_tokens"],
                                              "prompt_tokens_details": {"cached_tokens": match // 4}}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj):
        self.sent[0] += 1  # counted before it goes out: a client that has it never reads the count before it
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    _StubServer.seen, _StubServer.sent, _StubServer.gate, _StubServer.gate_timed_out = [], [0], None, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_stream_completion_stops_the_clock_at_the_first_streamed_token(stub_server):
    """A clock that reads the stub's event count: TTFT is the events sent between the request and the clock's
    stop. The stub holds the rest of the stream until the clock stopped, so a client that waited for the end
    (or stopped at the headers) reads another count than 1."""
    _StubServer.gate = gate = threading.Event()

    def clock() -> float:
        readings.append(_StubServer.sent[0])
        if len(readings) > 1:
            gate.set()
        return float(readings[-1])

    readings: list[int] = []
    c = stream_completion(stub_server, "stub", "a prompt", timeout=60, clock=clock)
    assert (c.ttft_s, c.text, c.first_token) == (1.0, " yes", None) and _StubServer.gate_timed_out == [False]
    assert c.usage == {"prompt_tokens": 2, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}}
    assert (c.prompt_tokens, c.cached_tokens, c.token_times) == (2, 0, [1.0])


def test_stream_completion_token_ids_and_every_token_event(stub_server):
    events = []
    c = stream_completion(stub_server, "stub", [1, 2, 3, 4], timeout=60, max_tokens=5,
                          extra={"return_token_ids": True}, clock=lambda: float(_StubServer.sent[0]),
                          on_token=events.append)
    assert _StubServer.seen == [[1, 2, 3, 4]]  # token ids go out as the prompt
    assert c.first_token == 7 and events == [1, 2, 3, 4, 5]
    assert len(c.token_times) == 5 and c.token_times == sorted(c.token_times) and c.sent_at == 0.0


def test_reset_prefix_cache_names_the_switch_a_server_needs(stub_server):
    with pytest.raises(RuntimeError, match="VLLM_SERVER_DEV_MODE=1"):
        reset_prefix_cache(stub_server, external=True)


def test_attached_mode_rows_prompts_and_hit_rates(stub_server, tmp_path):
    from bench.ttft.cli import main

    out = tmp_path / "server.json"
    report = main(["--server", stub_server, "--model", "stub", "--tokenizer", smollm2_dir(), "--num-docs", "2",
                   "--doc-tokens", "64", "--questions", "2", "--output", str(out)])
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["scenario"] for r in report.rows] == ["server-cold", "server-warm"]
    cold, warm = rows["server-cold"], rows["server-warm"]
    assert cold["requests"] == warm["requests"] == 4 and cold["status"] == warm["status"] == "ok"
    assert all(t > 0 for t in cold["ttft_s"] + warm["ttft_s"]) and warm["warmup_s"] > 0
    # cold: every prompt behind a line of its own, so nothing matches; then the documents, then the questions
    assert len(_StubServer.seen) == 4 + 2 + 4
    cold_prompts, docs, measured = _StubServer.seen[:4], _StubServer.seen[4:6], _StubServer.seen[6:]
    nonces = [p.split("\n", 1)[0] for p in cold_prompts]
    assert len(set(nonces)) == 4 and [p.split("\n", 1)[1] for p in cold_prompts] == measured
    assert all(any(m.startswith(d) for d in docs) for m in measured)
    assert cold["hit_rate"] == 0 and warm["hit_rate"] > 0.5


METRICS_TEXT = """\
# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 1291.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 512.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 0.0
vllm:lmcache_loaded_tokens_total{engine="0",model_name="m"} 256.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
lmcache_hit_rate 0.0
odd{label="a \\"quoted\\" value"} 2
"""


def test_metrics_parse_totals_and_deltas():
    before = metrics.parse(METRICS_TEXT)
    assert metrics.total(before, "vllm:prompt_tokens_by_source_total", source="local_compute") == 1291.0
    assert metrics.total(before, "vllm:request_success_total") == 4.0  # summed over finished_reason
    assert metrics.total(before, "odd", label='a \\"quoted\\" value') == 2.0
    assert metrics.total(before, "vllm:lmcache_hit_tokens_total") is None  # not exported
    after = metrics.parse(METRICS_TEXT.replace("} 1291.0", "} 1300.0").replace("} 256.0", "} 1280.0"))
    d = metrics.deltas(before, after)
    assert (d["computed_tok"], d["loaded_tok"], d["vllm_hit_tok"], d["requests_done"]) == (9.0, 1024.0, 0.0, 0.0)
    assert d["lmcache_hit_tok"] is None
