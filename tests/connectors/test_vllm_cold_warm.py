"""Cold then warm through real vLLM (CPU): identical outputs, and the warm run loads its prompts from the cache.

Prompts span several chunked-prefill steps (256 tokens a step), so chunks are saved as their last tokens'
KV is computed, across steps; a prompt shorter than a chunk and partial last chunks are in the batch. vLLM's
own prefix cache is off unless a test says otherwise, so every reused token comes from ours.
"""

import pytest

from tests.connectors.prompts import COLD_WARM, HALVES
from tests.connectors.vllm_helpers import (
    BLOCK, assert_same_outputs, connector_totals, expected_hit, flush_worker, make_llm, run, scheduler_half,
    shutdown, worker_half,
)

CHUNK = 128
EXTRA = {"chunk_size": CHUNK, "max_local_cpu_size": "64MB"}


@pytest.mark.parametrize("mode", [{}, {"layerwise": "on"}], ids=["whole-step", "layer-wise"])
def test_cold_then_warm_from_memory(tiny_model, reference, mode):
    ref = reference["cold_warm"]
    llm = make_llm(tiny_model, {**EXTRA, **mode})
    try:
        cold = run(llm, COLD_WARM)
        cold_totals = connector_totals(llm)
        flush_worker()
        warm = run(llm, COLD_WARM)
        totals = {k: v - cold_totals.get(k, 0) for k, v in connector_totals(llm).items()}
        assert not scheduler_half(llm).tracked(), "per-request state must be dropped at request_finished"
        l2 = worker_half().engine.stats()["L2"]
    finally:
        shutdown(llm)
    assert_same_outputs(ref, cold, "cold run")
    assert [o.num_cached_tokens for o in cold] == [0] * len(COLD_WARM)
    full_chunk_tokens = sum(len(p) // CHUNK * CHUNK for p in COLD_WARM)
    assert cold_totals.get("stored_tokens") == full_chunk_tokens
    assert not cold_totals.get("loaded_tokens") and not cold_totals.get("hit_tokens")
    assert_same_outputs(ref, warm, "warm run")
    expected = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in warm] == expected
    assert totals["loaded_tokens"] == sum(expected) >= 0.9 * full_chunk_tokens
    assert totals["requests"] == len(COLD_WARM) and totals["lookup_tokens"] == full_chunk_tokens
    assert totals["hit_tokens"] == full_chunk_tokens
    assert not totals.get("load_failed_tokens") and not totals.get("stored_tokens")
    assert l2["entries"] == full_chunk_tokens // CHUNK  # the workers' L2 served every load
    assert l2["hits"] == sum(-(-n // CHUNK) for n in expected)


def test_with_vllm_prefix_caching(tiny_model, reference):
    """vLLM's own prefix cache first, ours only for the tokens beyond it (num_computed_tokens)."""
    llm = make_llm(tiny_model, EXTRA, prefix_caching=True)
    try:
        assert_same_outputs(reference["cold_warm"], run(llm, COLD_WARM), "prefix caching, cold")
        flush_worker()
        llm.reset_prefix_cache()  # vLLM's cache empty, ours full
        halves = run(llm, HALVES)  # now vLLM's own cache holds the halves' whole blocks
        before = connector_totals(llm).get("loaded_tokens", 0)
        full = run(llm, COLD_WARM)
        loaded = connector_totals(llm).get("loaded_tokens", 0) - before
    finally:
        shutdown(llm)
    assert_same_outputs(reference["halves"], halves, "prefix caching, halves")
    assert_same_outputs(reference["cold_warm"], full, "prefix caching, full prompts")
    local = [min(len(h) // BLOCK * BLOCK, (len(p) - 1) // BLOCK * BLOCK) for h, p in zip(HALVES, COLD_WARM)]
    ours = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in full] == [max(a, b) for a, b in zip(local, ours)]
    assert loaded == sum(max(0, b - a) for a, b in zip(local, ours)) > 0


@pytest.mark.parametrize("mode", [{}, {"async_load": False}, {"layerwise": "on"}],
                         ids=["background-load", "synchronous-load", "background-load-layer-wise"])
def test_restart_loads_from_disk(tiny_model, reference, tmp_path, mode):
    """A fresh LLM (its memory tiers empty) finds what the first one stored on disk: by default the load runs
    in the background (the request waits in WAITING_FOR_REMOTE_KVS); synchronously before the forward pass
    with async_load off."""
    extra = {**EXTRA, "local_cache_dir": str(tmp_path), **mode}
    llm = make_llm(tiny_model, extra)
    try:
        run(llm, COLD_WARM)
    finally:
        shutdown(llm)  # the connector's shutdown waits for the disk writes
    llm = make_llm(tiny_model, extra)
    try:
        warm = run(llm, COLD_WARM)
        totals = connector_totals(llm)
        l3 = worker_half().engine.stats()["L3"]
    finally:
        shutdown(llm)
    assert_same_outputs(reference["cold_warm"], warm, "after a restart")
    expected = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in warm] == expected
    assert totals["loaded_tokens"] == sum(expected) and l3["hits"] > 0


def test_load_ending_inside_a_chunk(tiny_model):
    """chunk 256 over 128-token blocks: a repeated 512-token prompt loads 384 tokens, which end inside the
    second chunk; the load takes the part it needs of each chunk."""
    import random

    from tests.connectors.vllm_helpers import no_cache, random_tokens, warm_then_measure

    extra = {"chunk_size": 256, "max_local_cpu_size": "64MB", "cache_salt": "inside-a-chunk"}
    prompt = [random_tokens(random.Random(42), 512)]
    warm, totals = warm_then_measure(tiny_model, extra, prompt, prompt)
    assert_same_outputs(no_cache(tiny_model, prompt), warm, "repeat")
    assert warm[0].num_cached_tokens == expected_hit(512, 256) == 384
    assert not totals.get("load_failed_tokens")


def test_loads_are_counted_when_the_request_finishes_in_its_load_step(tiny_model):
    """max_tokens=1: the request finishes in the step that loads it (vLLM calls request_finished before it
    hands over that step's worker results): its loaded tokens still count."""
    from vllm import SamplingParams

    from tests.connectors.vllm_helpers import warm_then_measure

    one = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, detokenize=False)
    warm, totals = warm_then_measure(tiny_model, EXTRA, COLD_WARM, COLD_WARM, one)
    expected = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in warm] == expected
    assert totals["loaded_tokens"] == sum(expected) and not totals.get("load_failed_tokens")
