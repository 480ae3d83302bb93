"""connectors.segments: spans, segment chunk keys, the leading run, and RoPE re-rotation on a real model."""

import pytest
import torch

from connectors.segments import (
    SegmentChunk, SegmentError, check_segments, leading_run, parse_separator, segment_chunks, separator_ends,
    split_at_separator,
)
from kernels import chunk_hashes
from kernels.rope import rope_shift_ref


def test_split_at_separator_tiles_the_prompt():
    sep = [7, 8]
    tokens = [1, 2, 7, 8, 3, 7, 4, 7, 8, 5, 6]
    assert split_at_separator(tokens, sep) == [(0, 4), (4, 9), (9, 11)]
    assert split_at_separator([1, 2, 3], sep) == [(0, 3)]  # never appears: one span, nothing changes
    assert split_at_separator([7, 8], sep) == [(0, 2)]
    assert split_at_separator([], sep) == []
    assert split_at_separator([7, 7, 7], [7, 7]) == [(0, 2), (2, 3)]  # matches never overlap


def test_separator_ends_scans_left_to_right_without_overlaps():
    assert separator_ends([5, 1, 2, 1, 2, 9], [1, 2]) == [3, 5]
    assert separator_ends([7, 7, 7, 7], [7, 7]) == [2, 4]  # not 2, 3, 4
    assert separator_ends([7, 7, 7], [7, 7]) == [2]
    assert separator_ends([1, 2, 3], [4]) == [] and separator_ends([1], [1, 2]) == [] and separator_ends([1], []) == []


def test_parse_separator():
    assert parse_separator(None) is None and parse_separator("") is None
    assert parse_separator([3, 4]) == (3, 4)
    assert parse_separator("ids:13,198") == (13, 198)
    with pytest.raises(SegmentError, match="ids:<int>"):
        parse_separator("ids:13,x")
    assert parse_separator("\n\n", lambda s: [13, 13]) == (13, 13)
    with pytest.raises(SegmentError, match="tokenizer"):
        parse_separator("\n\n")
    with pytest.raises(SegmentError, match="segment_separator"):
        parse_separator([1, -2])
    with pytest.raises(SegmentError, match="no tokens"):
        parse_separator("x", lambda s: [])


@pytest.mark.parametrize("segments,match", [
    ("0-5", "list of"), ([[0, 5, 6]], r"\[0\]"), ([[3, 2]], "non-empty"), ([[0, 4], [3, 6]], "overlapping"),
    ([[0, 11]], "inside the prompt"), ([[True, 3]], "ints"),
])
def test_check_segments_errors_name_the_entry(segments, match):
    with pytest.raises(SegmentError, match=match):
        check_segments(segments, 10)


def test_check_segments_accepts_gaps():
    assert check_segments([[0, 3], [5, 10]], 10) == [(0, 3), (5, 10)]


def test_segment_chunks_are_position_independent_with_tails():
    passage = list(range(100, 110))  # 10 tokens: chunks of 4, 4 and a tail of 2
    a = [1, 2, 3] + passage
    b = [9] * 7 + passage + [5]
    ca = segment_chunks(a, [(3, 13)], chunk_size=4)
    cb = segment_chunks(b, [(7, 17)], chunk_size=4)
    assert [(c.start, c.length) for c in ca] == [(3, 4), (7, 4), (11, 2)]
    assert [(c.start, c.length) for c in cb] == [(7, 4), (11, 4), (15, 2)]
    assert [c.chunk_hash for c in ca] == [c.chunk_hash for c in cb]
    assert ca[0].chunk_hash == chunk_hashes(passage[:4], chunk_size=4, mode="segment")[0]
    assert ca[0].chunk_hash != chunk_hashes(passage[:4], chunk_size=4, mode="prefix")[0]
    assert segment_chunks(a, [(3, 13)], chunk_size=4, salt=b"t")[0].chunk_hash != ca[0].chunk_hash


def test_leading_run_stops_at_a_gap_a_miss_or_the_limit():
    chunks = [SegmentChunk(0, 4, b"a"), SegmentChunk(4, 2, b"b"), SegmentChunk(6, 4, b"c"), SegmentChunk(12, 4, b"d")]
    assert leading_run(0, chunks, [True] * 4, limit=100) == [0, 1, 2]  # 10..12 is not a segment
    assert leading_run(4, chunks, [True] * 4, limit=100) == [1, 2]  # prefix reuse covered 0..4
    assert leading_run(0, chunks, [True, False, True, True], limit=100) == [0]
    assert leading_run(0, chunks, [True] * 4, limit=9) == [0, 1]
    assert leading_run(2, chunks, [True] * 4, limit=100) == [0, 1, 2]  # from inside chunk 0: its rest loads
    assert leading_run(11, chunks, [True] * 4, limit=100) == []  # inside a gap


@pytest.fixture(scope="module")
def smollm2_model():
    from bench.models import load_smollm2

    return load_smollm2()


def _segment_kv(model, ids, position):
    with torch.no_grad():
        out = model(ids, position_ids=torch.arange(position, position + ids.shape[1])[None], use_cache=True)
    return [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in out.past_key_values.layers]


def test_rerotated_segment_k_matches_k_computed_at_the_new_position(smollm2_model):
    """SmolLM2-135M float32: a segment's K computed alone at p, re-rotated to q, equals its K computed alone
    at q within float32 rounding (transformers' own float32 RoPE angles err by ~q * 2^-24 rad); V does not
    depend on the position (layer 0 bit-exact; later layers within float32 rounding of the attention)."""
    model, tok = smollm2_model
    ids = torch.tensor([tok("Debian is a free operating system, developed by volunteers. " * 6)["input_ids"]])
    n = ids.shape[1]
    theta = model.config.rope_parameters["rope_theta"]
    head_dim = model.config.head_dim
    for p, q in ((0, 700), (700, 3)):
        at_p, at_q = _segment_kv(model, ids, p), _segment_kv(model, ids, q)
        for layer, ((k_p, v_p), (k_q, v_q)) in enumerate(zip(at_p, at_q)):
            moved = k_p.contiguous()
            rope_shift_ref(moved, torch.arange(p, p + n), torch.arange(q, q + n), theta, head_dim, True)
            scale = k_q.abs().max().item()
            atol = 4 * (max(p, q) + n) * 2.0 ** -24 * scale + 4e-6 * scale  # angle error + hidden-state drift
            err = (moved - k_q).abs().max().item()
            assert err <= atol, f"layer {layer}, {p}->{q}: K error {err} > {atol}"
            unrotated = (k_p - k_q).abs().max().item()
            assert unrotated > 100 * atol, f"layer {layer}: the test cannot tell rotated from not ({unrotated})"
            if layer == 0:
                assert torch.equal(v_p, v_q)
            else:
                torch.testing.assert_close(v_p, v_q, rtol=1e-4, atol=1e-5 * v_q.abs().max().item())
