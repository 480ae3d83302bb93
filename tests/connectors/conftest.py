"""Fixtures for the vLLM connector tests: a random-weight tiny Llama, reference outputs without the connector,
Redis servers (the real ones from tests/redis_servers.py), and a clean environment per test.

vLLM reads its environment when it is imported, so the variables are set here, before any test module
imports it: in-process engine core (the scheduler and worker halves in this process), a 1 GiB CPU KV cache.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.connectors import prompts  # noqa: E402
from tests.lmcache_core.conftest import (  # noqa: E402,F401  (the real Redis fixtures, shared)
    redis_binaries, redis_cluster, redis_cluster_client, redis_node, redis_node_factory,
)


@pytest.fixture(autouse=True)
def _connector_env(monkeypatch):
    """No LMCACHE_* from the caller's shell; the kernels' production CPU path (the torch reference: under
    TRITON_INTERPRET=1 every gather would go through Triton's interpreter). Each LLM's connector owns its
    cache engine and closes it when the LLM shuts down."""
    for var in list(os.environ):
        if var.startswith("LMCACHE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("LMCACHE_KERNEL_BACKEND", "torch")
    yield


def make_tiny_llama(path: str, layers: int = 2) -> str:
    """A Llama with random weights (std 0.2: peaked enough logits that greedy tokens are not near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def reference(tiny_model):
    """Outputs of every prompt set in tests/connectors/prompts.py without the connector, one LLM, one batch
    per set (the same batches the connector tests run)."""
    from tests.connectors.vllm_helpers import LONG_SAMPLING, SAMPLING, make_llm, run, shutdown

    llm = make_llm(tiny_model, connector=False)
    try:
        return {name: run(llm, batch, LONG_SAMPLING if name in prompts.LONG_DECODE else SAMPLING)
                for name, batch in prompts.TINY_SETS.items()}
    finally:
        shutdown(llm)
