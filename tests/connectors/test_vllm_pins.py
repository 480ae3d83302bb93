"""Hot prompts through real vLLM (CPU, tiny Llama, float32): a configured pinned prompt, and a request's own
pin and unpin (`kv_transfer_params`), keep a system prompt's chunks in L2 while unrelated traffic four times
L2's size passes through; without a pin they are evicted. L2 holds 8 chunks; max_hot_ratio lets 4 be pinned."""

import random

from vllm import SamplingParams

from tests.connectors.vllm_helpers import flush_worker, make_llm, random_tokens, run, shutdown, worker_half

CHUNK = 128
CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 32 * 4  # layers x K/V x tokens x kv heads x head dim x float32
BASE = {"chunk_size": CHUNK, "max_local_cpu_size": f"{8 * CHUNK_BYTES}B", "max_hot_ratio": 0.5,
        "hot_hit_threshold": 0, "hot_cache_ttl": 600}
rng = random.Random(11)
SYSTEM = random_tokens(rng, 3 * CHUNK)
TRAFFIC = [random_tokens(rng, 2 * CHUNK + 10) for _ in range(16)]  # 32 chunks: 4x L2


def _ask(llm, prompt, params=None):
    sampling = SamplingParams(max_tokens=2, temperature=0.0, detokenize=False,
                              extra_args={"kv_transfer_params": params} if params else None)
    out = llm.generate([{"prompt_token_ids": prompt}], sampling, use_tqdm=False)[0]
    flush_worker()  # pins are applied on the save thread, after the step's saves
    return out.num_cached_tokens


def _system_prompt_survives(model, extra, first_params=None, unpin_params=None) -> tuple[int, int]:
    """(tokens the system prompt's last request loaded, L2's pinned bytes after the traffic)."""
    llm = make_llm(model, {**BASE, **extra})
    try:
        _ask(llm, SYSTEM + random_tokens(rng, 40), first_params)
        if unpin_params is not None:
            _ask(llm, SYSTEM + random_tokens(rng, 40), unpin_params)
        run(llm, TRAFFIC)
        flush_worker()
        pinned = worker_half().engine.stats()["L2"]["pinned_bytes"]
        return _ask(llm, SYSTEM + random_tokens(rng, 40)), pinned
    finally:
        shutdown(llm)


def test_without_a_pin_the_traffic_evicts_the_system_prompt(tiny_model):
    assert _system_prompt_survives(tiny_model, {}) == (0, 0)


def test_a_configured_pinned_prompt_stays(tiny_model):
    ids = "ids:" + ",".join(map(str, SYSTEM))
    assert _system_prompt_survives(tiny_model, {"pinned_prompts": [ids]}) == (3 * CHUNK, 3 * CHUNK_BYTES)


def test_a_request_pins_then_another_unpins(tiny_model):
    assert _system_prompt_survives(tiny_model, {}, {"pin": 3 * CHUNK}) == (3 * CHUNK, 3 * CHUNK_BYTES)
    assert _system_prompt_survives(tiny_model, {}, {"pin": 3 * CHUNK}, {"unpin": 3 * CHUNK}) == (0, 0)
