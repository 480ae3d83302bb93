"""Batches through real vLLM (CPU): hits and misses mixed, shared prefixes, single-flight, preemption, aborts.

All with vLLM's prefix cache off, so every reused token comes from our cache and shows in num_cached_tokens.
"""

from connectors import vllm_v1
from tests.connectors.prompts import MIXED, PREEMPT, shared_prefix_hits
from tests.connectors.vllm_helpers import (
    LONG_SAMPLING, SAMPLING, assert_same_outputs, connector_totals, core, expected_hit, flush_worker, make_llm, run,
    scheduler_half, shutdown, worker_half,
)

CHUNK = 128


def test_mixed_batch_shares_prefixes_once_then_hits_everything(tiny_model, reference):
    vllm_v1.register()
    vllm_v1.register()  # idempotent: vLLM may load plugins more than once
    llm = make_llm(tiny_model, {"chunk_size": CHUNK}, module_path=False)  # found by name, through register()
    try:
        cold = run(llm, MIXED)
        cold_loaded = connector_totals(llm).get("loaded_tokens", 0)
        flush_worker()
        warm = run(llm, MIXED)
        assert not scheduler_half(llm)._reqs
        flush_worker()
        assert worker_half().engine.locks_held() == 0, "claims must be released once their chunks are stored"
    finally:
        shutdown(llm)
    ref = reference["mixed"]
    assert_same_outputs(ref, cold, "mixed batch, cold")
    assert_same_outputs(ref, warm, "mixed batch, warm")
    # Cold: a prompt sharing a prefix with an earlier one waits for it (single-flight), then loads it.
    shared = shared_prefix_hits(MIXED, CHUNK)
    assert [o.num_cached_tokens for o in cold] == shared
    assert cold_loaded == sum(shared) > 0
    assert [o.num_cached_tokens for o in warm] == [expected_hit(len(p), CHUNK) for p in MIXED]


def test_preemption_and_resumption(tiny_model, reference):
    """12 blocks of 128 tokens for prompts that fill them, ending just before block boundaries: decoding needs
    new blocks, so vLLM preempts running requests (freeing their
    blocks) and resumes them later; loads and saves stay correct across it."""
    llm = make_llm(tiny_model, {"chunk_size": CHUNK}, num_gpu_blocks_override=12, max_model_len=1024)
    scheduler = core(llm).scheduler
    preempted = []
    original = scheduler._preempt_request

    def counting(request, *args, **kwargs):  # a spy on vLLM's own preemption, not a replacement
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = counting
    try:
        cold = run(llm, PREEMPT, LONG_SAMPLING)
        cold_preempted = len(preempted)
        warm = run(llm, PREEMPT, LONG_SAMPLING)
    finally:
        shutdown(llm)
    assert cold_preempted > 0, "the test must make vLLM preempt"
    assert_same_outputs(reference["preempt"], cold, "preemption, cold")
    assert_same_outputs(reference["preempt"], warm, "preemption, warm")
    assert [o.num_cached_tokens for o in warm] == [expected_hit(len(p), CHUNK) for p in PREEMPT]


def test_aborted_request_releases_its_claims(tiny_model, reference):
    """A request aborted mid-prefill: its state is dropped and its claimed chunks are free again, so a request
    with the same prompt computes them at once instead of waiting lock_timeout; the others are unaffected."""
    from tests.connectors.prompts import COLD_WARM

    llm = make_llm(tiny_model, {"chunk_size": CHUNK})
    engine_api = llm.llm_engine
    try:
        for i, prompt in enumerate(COLD_WARM[:3] + [COLD_WARM[4]]):
            engine_api.add_request(f"r{i}", {"prompt_token_ids": prompt}, SAMPLING)
        for _ in range(3):
            engine_api.step()
        engine_api.abort_request(["r3"])  # 1100 tokens at 256 a step: mid-prefill, claims on its later chunks
        done = {}
        while engine_api.has_unfinished_requests():
            for out in engine_api.step():
                if out.finished:
                    done[out.request_id] = out
        assert "r3" not in done and not scheduler_half(llm)._reqs
        again = run(llm, [COLD_WARM[4]])  # would wait lock_timeout (10 s) on a leaked claim
        flush_worker()
        assert worker_half().engine.locks_held() == 0
    finally:
        shutdown(llm)
    got = [done[f"r{i}"].outputs[0] for i in range(3)]
    assert [tuple(o.token_ids) for o in got] == [r.token_ids for r in reference["cold_warm"][:3]]
    assert_same_outputs([reference["cold_warm"][4]], again, "after the abort")
