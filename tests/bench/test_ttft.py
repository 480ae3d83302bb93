"""`python -m bench.ttft`: the workloads' prompts, a smoke run of the CLI on real vLLM (SmolLM2-135M, tiny
documents) with every scenario, and server mode against a streaming stub server.

The stub server is a real HTTP server on 127.0.0.1 that streams server-sent events with known delays: it
stands in for a GPU server running `vllm serve`, which cannot exist on this machine.
"""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from bench.models import smollm2_dir
from bench.ttft_scenarios import SCENARIOS
from bench.ttft_workloads import build, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def smollm2() -> str:
    return smollm2_dir()  # converted once (~1 min), cached under ~/.cache/lmcache-core


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return load_tokenizer(smollm2)


# -- workloads ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["tile", "interleave", "random"])
def test_long_doc_qa_prompts_are_document_then_question(tokenizer, mode):
    w = build("long-doc-qa", tokenizer, num_docs=3, doc_tokens=300, questions=2, repeat_mode=mode)
    assert [len(r.tokens) for r in w.warmup] == [300] * 3
    assert len({r.tokens for r in w.warmup}) == 3, "documents must differ"
    assert len(w.measured) == 6 and len({r.tokens for r in w.measured}) == 6
    for r in w.measured:
        doc = int(r.label.split()[1])
        assert r.tokens[:300] == w.warmup[doc].tokens and len(r.tokens) > 300
    docs = [int(r.label.split()[1]) for r in w.measured]
    expected = {"tile": [0, 1, 2, 0, 1, 2], "interleave": [0, 0, 1, 1, 2, 2]}.get(mode)
    assert docs == expected if expected else sorted(docs) == [0, 0, 1, 1, 2, 2]


def test_multi_turn_history_grows_from_the_previous_turn(tokenizer):
    w = build("multi-turn", tokenizer, num_docs=2, doc_tokens=200, questions=3, turn_tokens=50)
    prompts = {r.label: r.tokens for r in w.warmup + w.measured}
    for c in range(2):
        for t in range(1, 4):
            prev, cur = prompts[f"conv {c} turn {t - 1}"], prompts[f"conv {c} turn {t}"]
            assert cur[: len(prev)] == prev and len(cur) > len(prev) + 100
    assert [r.label for r in w.measured][:2] == ["conv 0 turn 1", "conv 1 turn 1"]


def test_rag_prompts_start_with_one_stored_passage_and_hold_others(tokenizer):
    w = build("rag", tokenizer, num_docs=4, doc_tokens=100, questions=2, passages_per_prompt=3, seed=1)
    passages = [r.tokens for r in w.warmup]
    assert len(w.measured) == 8
    firsts = set()
    for r in w.measured:
        first = next(i for i, p in enumerate(passages) if r.tokens[:100] == p)
        firsts.add(first)
        contained = sum(any(r.tokens[k:k + 100] == p for k in range(len(r.tokens) - 99)) for p in passages)
        assert contained == 3
    assert len(firsts) > 1, "the passage order must vary"


# -- the CLI on vLLM ------------------------------------------------------------------------------------------

def test_cli_smoke_every_scenario(smollm2, tmp_path):
    out = tmp_path / "ttft.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "TRITON_INTERPRET", "VLLM_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.ttft", "--model", smollm2, "--num-docs", "1", "--doc-tokens", "384",
           "--questions", "2", "--chunk-size", "128", "--scenarios", ",".join(SCENARIOS), "--output", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in report["rows"]}
    assert set(SCENARIOS) <= set(rows), f"missing scenarios: {set(SCENARIOS) - set(rows)}"
    for name, row in rows.items():
        assert row["status"] in ("ok", "skipped", "failed"), row
        if row["status"] == "ok":
            assert row["requests"] == 2 and 0 < row["ttft_p50_s"] <= row["ttft_p90_s"], row
            assert row["speedup"] > 0 and row["hit_rate"] is not None, row
            assert row["first_token_mismatches"] == [], row
        else:
            assert row["reason"], f"{name} is {row['status']} without a reason"
    assert rows["recompute"]["status"] == "ok" and rows["recompute"]["hit_rate"] == 0
    for name in ("vllm-prefix-cache", "ours-L1", "ours-L2", "ours-L3"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["ours-L2"]["hit_rate"] > 0.9 and rows["ours-L2"]["loaded_MB"] > 0
    hits = {name: dict(p.split(":") for p in rows[name]["tier_hits"].split()) for name in ("ours-L2", "ours-L3")}
    assert int(hits["ours-L2"]["L2"]) > 0 and int(hits["ours-L2"]["L3"]) == 0, hits
    assert int(hits["ours-L3"]["L3"]) > 0 and int(hits["ours-L3"]["L2"]) == 0, hits
    assert rows["ours-L4"]["status"] == "skipped" and "--remote-url" in rows["ours-L4"]["reason"]
    assert rows["lmcache"]["status"] == "skipped" or rows["lmcache"]["requests"] == 2
    assert "recompute" in proc.stdout and "ours-L3" in proc.stdout  # the printed table


# -- server mode ------------------------------------------------------------------------------------------------

COLD_S, WARM_S, TAIL_S = 0.30, 0.03, 0.40


class _StubServer(BaseHTTPRequestHandler):
    """POST /v1/completions, stream=true: the first token after COLD_S, or WARM_S when an earlier prompt is a
    prefix of this one; then TAIL_S more before the usage event (a TTFT that waits for the end fails)."""

    seen: ClassVar[list[str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions" and body["stream"] and body["max_tokens"] == 1, (self.path, body)
        prompt = body["prompt"]
        match = max((len(p) for p in self.seen if prompt.startswith(p)), default=0)
        self.seen.append(prompt)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(WARM_S if match else COLD_S)
        self._event({"choices": [{"index": 0, "text": " yes", "finish_reason": None}]})
        time.sleep(TAIL_S)
        self._event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        n = len(prompt) // 4
        self._event({"choices": [], "usage": {"prompt_tokens": n, "completion_tokens": 1,
                                              "prompt_tokens_details": {"cached_tokens": match // 4}}})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    _StubServer.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_mode_measures_time_to_first_streamed_token(stub_server, smollm2, tmp_path):
    from bench.ttft import main

    out = tmp_path / "server.json"
    report = main(["--server", stub_server, "--model", "stub", "--tokenizer", smollm2, "--num-docs", "2",
                   "--doc-tokens", "64", "--questions", "2", "--output", str(out)])
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["scenario"] for r in report.rows] == ["server-cold", "server-warm"]
    cold, warm = rows["server-cold"], rows["server-warm"]
    assert cold["requests"] == warm["requests"] == 4
    assert all(COLD_S <= t < COLD_S + TAIL_S for t in cold["ttft_s"]), cold["ttft_s"]
    assert all(WARM_S <= t < COLD_S for t in warm["ttft_s"]), warm["ttft_s"]
    assert warm["speedup"] > 2 and cold["hit_rate"] == 0 and warm["hit_rate"] > 0.5
    assert warm["warmup_s"] >= 2 * COLD_S  # two documents, each cold once
    assert len(_StubServer.seen) == 4 + 2 + 4
