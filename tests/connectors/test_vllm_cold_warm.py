"""Cold then warm through real vLLM (CPU): identical outputs, and the warm run loads its prompts from the cache.

Prompts span several chunked-prefill steps (256 tokens a step), so chunks are saved as their last tokens'
KV is computed, across steps; a prompt shorter than a chunk and partial last chunks are in the batch.
"""

from prometheus_client import REGISTRY

from connectors import registry
from tests.connectors.prompts import COLD_WARM, HALVES
from tests.connectors.vllm_helpers import (
    BLOCK, assert_same_outputs, expected_hit, make_llm, no_cache, run, scheduler_half, shutdown,
    warm_then_measure, worker_half,
)

CHUNK = 128
EXTRA = {"chunk_size": CHUNK, "max_local_cpu_size": "64MB"}


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_total") or 0.0


def test_cold_then_warm_in_a_fresh_llm(tiny_model, reference):
    ref = reference["cold_warm"]
    llm = make_llm(tiny_model, EXTRA)
    try:
        cold = run(llm, COLD_WARM)
        cold_totals = dict(worker_half().stats.totals)
    finally:
        shutdown(llm)
    assert_same_outputs(ref, cold, "cold run")
    assert [o.num_cached_tokens for o in cold] == [0] * len(COLD_WARM)
    full_chunk_tokens = sum(len(p) // CHUNK * CHUNK for p in COLD_WARM)
    assert cold_totals.get("stored_tokens") == full_chunk_tokens
    assert not cold_totals.get("loaded_tokens")

    lookups, asked, hits = (_counter(f"lmcache_{n}") for n in ("lookups", "lookup_tokens", "hit_tokens"))
    llm = make_llm(tiny_model, EXTRA)  # a fresh LLM: vLLM's prefix cache is empty, our engine is the same
    try:
        warm = run(llm, COLD_WARM)
        totals = dict(worker_half().stats.totals)
        assert not scheduler_half(llm)._reqs, "per-request state must be dropped at request_finished"
    finally:
        shutdown(llm)
    assert_same_outputs(ref, warm, "warm run")
    expected = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in warm] == expected
    assert totals["loaded_tokens"] == sum(expected) >= 0.9 * full_chunk_tokens
    assert not totals.get("load_failed_tokens") and not totals.get("stored_tokens")
    # lmcache_hit_rate's counters moved once per request, by whole-chunk prompt tokens
    assert _counter("lmcache_lookups") - lookups == len(COLD_WARM)
    assert _counter("lmcache_lookup_tokens") - asked == full_chunk_tokens
    assert _counter("lmcache_hit_tokens") - hits == full_chunk_tokens
    assert REGISTRY.get_sample_value("lmcache_hit_rate") > 0


def test_with_vllm_prefix_caching(tiny_model, reference):
    """vLLM's own prefix cache first, ours only for the tokens beyond it (num_computed_tokens)."""
    llm = make_llm(tiny_model, EXTRA, prefix_caching=True)
    try:
        assert_same_outputs(reference["cold_warm"], run(llm, COLD_WARM), "prefix caching, cold")
    finally:
        shutdown(llm)
    llm = make_llm(tiny_model, EXTRA, prefix_caching=True)  # fresh: vLLM's cache empty, ours full
    try:
        halves = run(llm, HALVES)  # now vLLM's own cache holds the halves' whole blocks
        before = worker_half().stats.totals.get("loaded_tokens", 0)
        full = run(llm, COLD_WARM)
        loaded = worker_half().stats.totals.get("loaded_tokens", 0) - before
    finally:
        shutdown(llm)
    assert_same_outputs(reference["halves"], halves, "prefix caching, halves")
    assert_same_outputs(reference["cold_warm"], full, "prefix caching, full prompts")
    local = [min(len(h) // BLOCK * BLOCK, (len(p) - 1) // BLOCK * BLOCK) for h, p in zip(HALVES, COLD_WARM)]
    ours = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in full] == [max(a, b) for a, b in zip(local, ours)]
    assert loaded == sum(max(0, b - a) for a, b in zip(local, ours)) > 0
    assert len(registry.engines()) == 1


def test_load_ending_inside_a_chunk(tiny_model):
    """chunk 256 over 128-token blocks: a repeated 512-token prompt loads 384 tokens, which end inside the
    second chunk; retrieve still fills whole chunks, so the staging buffer must hold them."""
    import random

    from tests.connectors.vllm_helpers import random_tokens

    extra = {"chunk_size": 256, "max_local_cpu_size": "64MB", "cache_salt": "inside-a-chunk"}
    prompt = [random_tokens(random.Random(42), 512)]
    warm, totals = warm_then_measure(tiny_model, extra, prompt, prompt)
    assert_same_outputs(no_cache(tiny_model, prompt), warm, "repeat")
    assert warm[0].num_cached_tokens == expected_hit(512, 256) == 384
    assert not totals.get("load_failed_tokens")
