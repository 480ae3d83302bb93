"""Segment reuse through real vLLM (CPU, tiny random Llama, float32): cached passages load at new positions.

Passages are random tokens of lengths that are not multiples of the chunk (128) or block (128) size, so
segments start inside blocks and end in partial tail chunks: every load goes through the per-token path
(vLLM's own CPU cache-write op) with K re-rotated.
"""

import random

import pytest
from vllm import SamplingParams

from tests.connectors.vllm_helpers import (
    assert_same_outputs, connector_totals, flush_worker, make_llm, no_cache, random_tokens, shutdown,
    warm_then_measure,
)

CHUNK = 128
SEP = [999, 999]
BASE = {"chunk_size": CHUNK, "max_local_cpu_size": "64MB"}
SEGMENTS = {**BASE, "segment_reuse": True, "segment_separator": "ids:999,999"}


@pytest.fixture(scope="module")
def passages():
    rng = random.Random(7)
    return {name: random_tokens(rng, n)
            for name, n in (("A", 200), ("B", 330), ("C", 150), ("P", 60), ("Q1", 40), ("Q2", 57))}


def joined(passages, *names, question=None):
    tokens = [t for n in names for t in passages[n] + SEP]
    return tokens + (passages[question] if question else [])


def test_passages_in_a_new_order_load_as_segments(tiny_model, passages):
    warmup = [joined(passages, n) for n in ("A", "B", "C")]  # each passage alone, ending with the separator
    prompt = joined(passages, "C", "A", "B", question="Q1")
    reused = len(prompt) - len(passages["Q1"])
    outs, totals = warm_then_measure(tiny_model, SEGMENTS, warmup, [prompt])
    assert outs[0].num_cached_tokens == reused
    assert totals["loaded_tokens"] == reused
    prefix = (len(passages["C"]) + len(SEP)) // CHUNK * CHUNK  # C was stored as a prompt's start too
    assert totals["segment_loaded_tokens"] == reused - prefix
    assert not totals.get("load_failed_tokens")
    assert len(outs[0].token_ids) > 0


def test_a_short_cached_preamble_then_passages_load_without_any_prefix_chunk(tiny_model, passages):
    """A preamble shorter than a chunk: no prefix chunk matches, the whole run comes from segments (a step
    whose only loads are segment loads)."""
    warmup = [joined(passages, n) for n in ("P", "A", "B")]
    prompt = joined(passages, "P", "B", "A", question="Q2")
    reused = len(prompt) - len(passages["Q2"])
    outs, totals = warm_then_measure(tiny_model, SEGMENTS, warmup, [prompt])
    assert outs[0].num_cached_tokens == reused
    assert totals["segment_loaded_tokens"] == totals["loaded_tokens"] == reused
    assert not totals.get("load_failed_tokens")


def test_without_segment_reuse_only_the_exact_prefix_loads(tiny_model, passages):
    warmup = [joined(passages, n) for n in ("A", "B", "C")]
    prompt = joined(passages, "C", "A", "B", question="Q1")
    for extra in (BASE, {**SEGMENTS, "segment_separator": "ids:998,997,996"}):  # off; a separator never seen
        outs, totals = warm_then_measure(tiny_model, extra, warmup, [prompt])
        prefix = (len(passages["C"]) + len(SEP)) // CHUNK * CHUNK
        assert outs[0].num_cached_tokens == prefix, extra
        assert not totals.get("segment_loaded_tokens"), extra


def test_explicit_segments_from_the_request(tiny_model, passages):
    a, b = passages["A"], passages["B"]
    extra = {**BASE, "segment_reuse": True}  # no separator: only the requests' own boundaries
    spans = lambda *lengths: [[sum(lengths[:i]), sum(lengths[:i + 1])] for i in range(len(lengths))]  # noqa: E731
    params = lambda segs: SamplingParams(max_tokens=4, temperature=0.0, logprobs=0,  # noqa: E731
                                         extra_args={"kv_transfer_params": {"segments": segs}})
    llm = make_llm(tiny_model, extra)
    try:
        llm.generate([{"prompt_token_ids": a}], params(spans(len(a))), use_tqdm=False)
        llm.generate([{"prompt_token_ids": b}], params(spans(len(b))), use_tqdm=False)
        flush_worker()
        before = connector_totals(llm)
        prompt = b + a + passages["Q2"]
        out = llm.generate([{"prompt_token_ids": prompt}], params(spans(len(b), len(a), len(passages["Q2"]))),
                           use_tqdm=False)
        totals = {k: v - before.get(k, 0) for k, v in connector_totals(llm).items()}
    finally:
        shutdown(llm)
    assert out[0].num_cached_tokens == len(b) + len(a)
    assert totals["segment_loaded_tokens"] == len(b) + len(a) - len(b) // CHUNK * CHUNK


def test_segments_at_the_positions_they_were_computed_give_identical_outputs(tiny_model, passages):
    """The same passages in the same order after the same start: segment KV is exact there (re-rotation by
    0, same context), so outputs equal a run without any cache, while the segment path loads the tails
    past the last whole prefix chunk."""
    first = joined(passages, "A", "B", question="Q1")
    second = joined(passages, "A", "B", question="Q2")
    reference = no_cache(tiny_model, [second])
    outs, totals = warm_then_measure(tiny_model, SEGMENTS, [first], [second])
    assert_same_outputs(reference, outs, "segments at their own positions")
    shared = len(second) - len(passages["Q2"])
    assert outs[0].num_cached_tokens == shared
    assert totals["segment_loaded_tokens"] == shared - shared // CHUNK * CHUNK > 0


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    from tests.connectors.conftest import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("one-layer-llama")), layers=1)


@pytest.mark.parametrize("rerotate", [True, False], ids=["rerotated", "not-rerotated"])
def test_one_layer_model_reused_segments_are_exact_only_when_rerotated(one_layer_model, passages, rerotate):
    """In a one-layer model a token's K and V depend on nothing but the token and (K, through RoPE) its
    position, so a passage's cached KV moved to a new position and re-rotated IS the KV computed there:
    outputs equal a run without any cache. Without re-rotation they do not: the test can tell."""
    warmup = [joined(passages, n) for n in ("A", "B")]
    prompt = joined(passages, "B", "A", question="Q1")
    reference = no_cache(one_layer_model, [prompt])
    extra = {**SEGMENTS, "segment_rerotate": rerotate}
    outs, totals = warm_then_measure(one_layer_model, extra, warmup, [prompt])
    assert totals["segment_loaded_tokens"] > len(passages["A"])  # A moved from position 0 to after B
    if rerotate:
        assert_same_outputs(reference, outs, "re-rotated segments")
    else:
        worst = max(abs(a - b) for a, b in zip(reference[0].logprobs, outs[0].logprobs))
        assert outs[0].token_ids != reference[0].token_ids or worst > 1e-3, "re-rotation made no difference"


def test_a_model_without_rope_is_refused_at_start_up(tmp_path):
    """GPT-2 has learned positions: segment reuse cannot re-rotate it, so start-up fails and says why."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1000, n_positions=1024)).save_pretrained(
        tmp_path)
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    try:
        with pytest.raises(Exception, match="rotary position embedding"):
            make_llm(str(tmp_path), SEGMENTS, max_model_len=1024)
    finally:  # the failed start leaves its connector in vLLM's process-wide slot: the next LLM would get it
        ensure_kv_transfer_shutdown()
