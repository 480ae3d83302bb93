"""`python -m bench.ttft`: the workloads' prompts, the quality figures and the rag report on hand-made
results, a smoke run of the in-process mode on real vLLM (SmolLM2-135M, tiny documents) with every scenario,
and the rag segment-reuse scenarios end to end. Server mode: test_ttft_server_mode.py, its parts in
test_ttft_servers.py and test_ttft_client.py.
"""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bench.models import smollm2_dir
from bench.ttft.cli import parse_config
from bench.ttft.quality import agreement, continuation_logprobs, mean_nll, perplexity_ratio, quality_figures
from bench.ttft.report import summarize
from bench.ttft.results import Result
from bench.ttft.scenarios import SCENARIOS, SEGMENT_SCENARIOS, default_scenarios
from bench.ttft.segment import segment_overrides
from bench.ttft.targets import segment_target_notes
from bench.ttft.workloads import RAG_PREAMBLE, build, load_tokenizer
from connectors.segments import separator_ends

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


@pytest.mark.parametrize("preamble", [RAG_PREAMBLE, ""])
def test_rag_prompts_are_passages_each_ending_with_the_separator_then_a_question(tokenizer, preamble):
    w = build("rag", tokenizer, num_docs=5, doc_tokens=150, questions=2, passages_per_prompt=3, seed=1,
              rag_preamble=preamble)
    sep = w.separator
    assert sep == tuple(tokenizer.encode("\n\n", add_special_tokens=False)) and len(sep) == 1
    head = tuple(tokenizer.encode(preamble, add_special_tokens=False)) + sep if preamble else ()
    h, n = len(head), 150 + len(sep)
    # warm-up: the instruction, then one passage followed by the separator, so the passage is one segment
    for r in w.warmup:
        assert r.tokens[:h] == head and r.tokens[-len(sep):] == sep and len(r.tokens) == h + n
        assert h == 0 or h in separator_ends(r.tokens, sep)  # the instruction is a segment of its own
    passages = [r.tokens[h: h + 150] for r in w.warmup]
    assert len(set(passages)) == 5
    assert len(w.measured) == 10
    orders = []
    for r in w.measured:
        assert r.tokens[:h] == head
        order = [passages.index(r.tokens[h + i * n: h + i * n + 150]) for i in range(3)]  # raises if none
        assert len(set(order)) == 3
        for i in range(3):  # the separator right after each passage: the tokens the connector splits at
            assert r.tokens[h + i * n + 150: h + (i + 1) * n] == sep
        question = tokenizer.decode(list(r.tokens[h + 3 * n:]))
        assert question.startswith("Question: ") and question.endswith("Answer:"), question
        # Every separator is the instruction's, a passage's end, or one inside a passage where the warm-up
        # has it too: the question is the last segment, whole, and passages split alike everywhere.
        expected = {h} if h else set()
        for i, p in enumerate(order):
            expected |= {i * n + e for e in separator_ends(w.warmup[p].tokens, sep) if e > h}
        assert set(separator_ends(r.tokens, sep)) == expected
        assert r.label.startswith(f"passages {order} ")
        orders.append(tuple(order))
    assert len({o[0] for o in orders}) > 1 and len(set(orders)) > 5, "orders and combinations must vary"


def test_rag_cli_defaults_and_scenarios():
    cfg = parse_config(["--workload", "rag"])
    assert (cfg.num_docs, cfg.doc_tokens, cfg.questions) == (6, 400, 2) and cfg.scenarios == ()
    assert cfg.rag_preamble == RAG_PREAMBLE and parse_config(["--rag-preamble", ""]).rag_preamble == ""
    assert default_scenarios("rag") == ("recompute", *SEGMENT_SCENARIOS)
    assert not set(SEGMENT_SCENARIOS) & set(default_scenarios("long-doc-qa"))
    assert set(SEGMENT_SCENARIOS) <= set(SCENARIOS)
    quick = parse_config(["--workload=rag", "--quick", "--doc-tokens", "333"])
    assert (quick.num_docs, quick.doc_tokens, quick.questions) == (4, 333, 1)
    assert parse_config(["--quick"]).num_docs == 1  # long-doc-qa's --quick is unchanged
    cfg = parse_config(["--workload", "rag", "--scenarios", "recompute,ours-prefix"])
    assert cfg.scenarios == ("recompute", "ours-prefix")
    assert segment_overrides("ours-prefix", (1116,)) == {"segment_reuse": False}
    assert segment_overrides("ours-segment", (13, 198)) == {"segment_reuse": True, "segment_separator": "ids:13,198"}
    assert segment_overrides("ours-segment-norotate", (1116,))["segment_rerotate"] is False


# -- quality figures --------------------------------------------------------------------------------------------

def test_agreement_counts_identical_continuations_and_leading_tokens():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    got = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]]  # identical; diverges at token 3; at token 1
    assert agreement(ref, got) == (pytest.approx(1 / 3), pytest.approx((1 + 2 / 4 + 0) / 3))
    assert agreement(ref, ref) == (1.0, 1.0)
    assert agreement([[1, 2, 3, 4]], [[1, 2]]) == (0.0, 0.5)  # a short continuation: missing tokens disagree
    assert agreement([[1, 2]], [[1, 2, 3]]) == (1.0, 1.0)  # tokens past the reference's end do not count
    with pytest.raises(ValueError):
        agreement(ref, got[:2])


def _logprobs(prompt_len: int, continuation: list[int], values: list[float], extra_token: int = 99) -> list:
    """vLLM's prompt_logprobs shape: None for position 0, then {token id: Logprob} (the prompt token, and
    with prompt_logprobs=1 possibly the top token)."""
    out = [None] + [{7: SimpleNamespace(logprob=-0.5)} for _ in range(prompt_len - 1)]
    return out + [{t: SimpleNamespace(logprob=v), extra_token: SimpleNamespace(logprob=-0.01)}
                  for t, v in zip(continuation, values)]


def test_continuation_logprobs_nll_and_perplexity_ratio():
    cont = [11, 12, 13]
    lps = continuation_logprobs(_logprobs(5, cont, [-1.0, -2.0, -3.0]), cont)
    assert lps == [-1.0, -2.0, -3.0]
    with pytest.raises(ValueError):
        continuation_logprobs(_logprobs(5, cont, [-1.0, -2.0, -3.0]), [11, 12, 14])  # not the scored tokens
    with pytest.raises(ValueError):
        continuation_logprobs([None, {11: SimpleNamespace(logprob=-1.0)}], [5, 11])  # position 0 has none
    assert mean_nll([[-1.0, -2.0], [-3.0, -2.0]]) == pytest.approx(2.0)
    assert perplexity_ratio(2.0, 2.0) == 1.0 and perplexity_ratio(2.5, 2.0) == pytest.approx(math.exp(0.5))
    figures = quality_figures([[1, 2], [3, 4]], [[-1.0, -1.0], [-1.0, -1.0]], [[1, 2], [3, 0]],
                              [[-1.5, -1.5], [-1.5, -1.5]])
    assert figures == {"agree": 0.5, "agree_tok": 0.75, "nll": 1.5, "ppl_ratio": pytest.approx(math.exp(0.5))}


def _result(name, ttft, cached, reused=None, segment=None, conts=None, lps=None, prompt=1000) -> Result:
    n = len(cached)
    return Result(name, labels=[f"p{i}" for i in range(n)], ttft_s=[ttft] * n, first_tokens=[1] * n,
                  prompt_tokens=[prompt] * n, cached_tokens=list(cached), reused_tokens=list(reused or []),
                  segment_tokens=list(segment or []), continuations=conts or [], ref_logprobs=lps or [])


def test_rag_report_columns_and_target_notes():
    ref = [(1, 2, 3, 4), (5, 6, 7, 8)]
    base = _result("recompute", 2.0, [0, 0], conts=ref, lps=[[-1.0] * 4] * 2)
    prefix = _result("ours-prefix", 1.5, [256, 256], [256, 256], [0, 0], ref, [[-1.0] * 4] * 2)
    seg = _result("ours-segment", 0.2, [900, 960], [900, 960], [644, 704], [ref[0], (5, 6, 0, 0)],
                  [[-1.1] * 4] * 2)
    norot = _result("ours-segment-norotate", 0.2, [900, 960], [900, 960], [644, 704], [(0,) * 4, (5, 0, 0, 0)],
                    [[-2.0] * 4] * 2)
    seg.first_tokens, norot.first_tokens = [1, 1], [2, 1]  # a differing first token is reported, not failed
    rows = {r["scenario"]: r for r in summarize([base, prefix, seg, norot], "recompute", kv_bytes_per_token=100)}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["ours-segment-norotate"]["first_token_mismatches"] == ["p0"]
    assert rows["recompute"]["reused_tok"] == 0 and rows["recompute"]["ppl_ratio"] == 1.0
    assert rows["ours-prefix"]["agree"] == 1.0 and rows["ours-prefix"]["ppl_ratio"] == 1.0
    s = rows["ours-segment"]
    assert s["reused_tok"] == 930 and s["segment_tok"] == 674 and s["x_prefix"] == pytest.approx(930 / 256)
    assert s["agree"] == 0.5 and s["agree_tok"] == pytest.approx((1 + 0.5) / 2)
    assert s["nll"] == pytest.approx(1.1) and s["ppl_ratio"] == pytest.approx(math.exp(0.1))
    notes = segment_target_notes(list(rows.values()))
    text = "\n".join(notes)
    assert "3.63x met" in text, text
    assert "TTFT below ours-prefix's" in text and "(13%)" in text and notes[1].endswith(" met")
    assert "1 of 2 continuations identical" in text and "perplexity x1.105" in text
    assert notes[-1].startswith("target re-rotation beats no re-rotation") and notes[-1].endswith(" met")
    # a tie is not a win; a failed prefix reuse with none at all
    norot.continuations, norot.ref_logprobs = seg.continuations, seg.ref_logprobs
    rows = summarize([base, prefix, seg, norot], "recompute", kv_bytes_per_token=100)
    assert segment_target_notes(rows)[-1].endswith("MISSED")
    prefix.reused_tokens = prefix.cached_tokens = [0, 0]
    prefix.status = "ok"
    rows = summarize([base, prefix, seg], "recompute", kv_bytes_per_token=100)
    assert "= no prefix reuse at all met" in segment_target_notes(rows)[0]


# -- the CLI on vLLM ------------------------------------------------------------------------------------------

# What may not run in the smoke run below, and the reason the benchmark gives for it; every other scenario
# must run ("ok"): a peer that fails is a failed test, not a row to accept.
SMOKE_SKIPS = {
    "ours-L4": "needs --remote-url",
    **{name: "pass --workload rag" for name in SEGMENT_SCENARIOS},
    "example-connector-1step": "every prompt fits in one prefill step",
    "offloading-connector": "needs a CUDA-alike or XPU GPU",  # on a GPU it must run
    "lmcache": "lmcache is not installed",  # where it is installed it must run
}


def test_cli_smoke_every_scenario(smollm2, tmp_path):
    out = tmp_path / "ttft.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "TRITON_INTERPRET", "VLLM_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.ttft", "--mode", "inprocess", "--model", smollm2, "--num-docs", "1",
           "--doc-tokens", "384",
           "--questions", "2", "--chunk-size", "128", "--scenarios", ",".join(SCENARIOS), "--output", str(out),
           "--plot", str(tmp_path / "not-yet" / "ttft.png")]  # as `make demo` on a fresh clone: no results/ yet
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in report["rows"]}
    assert set(SCENARIOS) <= set(rows), f"missing scenarios: {set(SCENARIOS) - set(rows)}"
    for name, row in rows.items():
        if row["status"] == "skipped" and name in SMOKE_SKIPS:
            assert SMOKE_SKIPS[name] in row["reason"], (name, row["reason"])
            continue
        assert row["status"] == "ok", (name, row["status"], row["reason"])
        assert row["requests"] == 2 and 0 < row["ttft_p50_s"] <= row["ttft_p90_s"], row
        assert row["speedup"] > 0 and row["hit_rate"] is not None, row
        assert row["first_token_mismatches"] == [], row
    assert rows["recompute"]["status"] == "ok" and rows["recompute"]["hit_rate"] == 0
    for name in ("vllm-prefix-cache", "ours-L1", "ours-L2", "ours-L3"):
        assert rows[name]["status"] == "ok", rows[name]
    assert rows["ours-L2"]["hit_rate"] > 0.9 and rows["ours-L2"]["loaded_MB"] > 0
    hits = {name: dict(p.split(":") for p in rows[name]["tier_hits"].split()) for name in ("ours-L2", "ours-L3")}
    assert int(hits["ours-L2"]["L2"]) > 0 and int(hits["ours-L2"]["L3"]) == 0, hits
    assert int(hits["ours-L3"]["L3"]) > 0 and int(hits["ours-L3"]["L2"]) == 0, hits
    assert rows["ours-L4"]["status"] == "skipped" and "--remote-url" in rows["ours-L4"]["reason"]
    assert "recompute" in proc.stdout and "ours-L3" in proc.stdout  # the printed table
    assert (tmp_path / "not-yet" / "ttft.png").stat().st_size > 0
    assert report["config"]["model_name"] == "SmolLM2-135M-Instruct"  # the plot's title names it so


def test_cli_rag_segment_reuse_speed_and_quality(smollm2, tmp_path):
    """recompute, ours-prefix, ours-segment, ours-segment-norotate on 3 prompts of 3 passages (~1 minute).
    Passages of 150 tokens are shorter than a chunk: every passage loads from segment chunks alone. The
    connector must take the segment-reuse settings: a refusal fails the scenarios, and so this test."""
    out = tmp_path / "rag.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "TRITON_INTERPRET", "VLLM_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.ttft", "--model", smollm2, "--workload", "rag", "--num-docs", "3",
           "--doc-tokens", "150", "--questions", "1", "--output", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in report["rows"]}
    assert list(rows) == ["recompute", *SEGMENT_SCENARIOS]
    for row in rows.values():
        assert row["status"] == "ok" and row["requests"] == 3, (row["scenario"], row["reason"])
    base, prefix, seg, norot = (rows[s] for s in ("recompute", *SEGMENT_SCENARIOS))
    assert base["reused_tok"] == 0 and base["agree"] == 1 and base["ppl_ratio"] == 1
    # exact prefix reuse: recompute's output, and recompute's likelihoods
    assert prefix["agree"] == 1 and prefix["ppl_ratio"] == pytest.approx(1, abs=1e-3)
    assert prefix["first_token_mismatches"] == []
    # segment reuse: every passage loaded (the question is computed), most of it from segment chunks
    assert seg["reused_tok"] > prefix["reused_tok"] and seg["hit_rate"] > 0.9 and seg["segment_tok"] > 0
    assert seg["reused_tok"] == norot["reused_tok"]
    assert seg["ppl_ratio"] < norot["ppl_ratio"], "re-rotated K must fit recompute better than unrotated K"
    notes = "\n".join(report["notes"])
    for target in ("tokens of ours-prefix", "TTFT below ours-prefix's", "quality of ours-segment vs recompute",
                   "re-rotation beats no re-rotation"):
        assert target in notes, notes
    assert "ppl_ratio" in proc.stdout and "x_prefix" in proc.stdout  # the printed table's columns
