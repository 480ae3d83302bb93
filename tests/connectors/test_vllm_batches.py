"""Batches through real vLLM (CPU): hits and misses mixed, shared prefixes, single-flight, preemption, aborts.

All with vLLM's prefix cache off, so every reused token comes from our cache and shows in num_cached_tokens.
"""

import pytest

from connectors import vllm_v1
from tests.connectors.prompts import MIXED, PREEMPT, shared_prefix_hits
from tests.connectors.vllm_helpers import (
    LONG_SAMPLING, SAMPLING, assert_same_outputs, connector_totals, core, expected_hit, flush_worker, make_llm, run,
    scheduler_half, shutdown, worker_half,
)

CHUNK = 128


@pytest.mark.parametrize("mode", [{}, {"layerwise": "on"}], ids=["whole-step", "layer-wise"])
def test_mixed_batch_shares_prefixes_once_then_hits_everything(tiny_model, reference, mode):
    vllm_v1.register()
    vllm_v1.register()  # idempotent: vLLM may load plugins more than once
    llm = make_llm(tiny_model, {"chunk_size": CHUNK, "max_local_cpu_size": "64MB", **mode},
                   module_path=False)  # found by name, through register()
    try:
        cold = run(llm, MIXED)
        cold_loaded = connector_totals(llm).get("loaded_tokens", 0)
        flush_worker()
        warm = run(llm, MIXED)
        assert not scheduler_half(llm).tracked()
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


@pytest.mark.parametrize("mode", [{}, {"layerwise": "on"}], ids=["whole-step", "layer-wise"])
def test_preemption_and_resumption(tiny_model, reference, mode):
    """12 blocks of 128 tokens for prompts that fill them, ending just before block boundaries: decoding needs
    new blocks, so vLLM preempts running requests (freeing their
    blocks) and resumes them later; loads and saves stay correct across it."""
    llm = make_llm(tiny_model, {"chunk_size": CHUNK, "max_local_cpu_size": "64MB", **mode},
                   num_gpu_blocks_override=12, max_model_len=1024)
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

    llm = make_llm(tiny_model, {"chunk_size": CHUNK, "max_local_cpu_size": "64MB"})
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
        assert "r3" not in done and not scheduler_half(llm).tracked()
        again = run(llm, [COLD_WARM[4]])  # would wait lock_timeout (10 s) on a leaked claim
        flush_worker()
        assert worker_half().engine.locks_held() == 0
    finally:
        shutdown(llm)
    got = [done[f"r{i}"].outputs[0] for i in range(3)]
    assert [tuple(o.token_ids) for o in got] == [r.token_ids for r in reference["cold_warm"][:3]]
    assert_same_outputs([reference["cold_warm"][4]], again, "after the abort")


def test_abort_while_a_background_load_is_in_flight(tiny_model, reference, redis_node, tmp_path):
    """A request whose hit is on disk loads in the background (vLLM keeps it in WAITING_FOR_REMOTE_KVS). The
    disk copies are damaged, so the load falls through to Redis, which hangs (SIGSTOP): the load is in flight,
    for certain, when the request is aborted. vLLM may free its blocks only once the load reports finished:
    it does, after Redis resumes; no claim leaks; the next requests load and compute correctly."""
    import glob
    import threading
    import time

    from tests.connectors.prompts import COLD_WARM

    extra = {"chunk_size": CHUNK, "remote_url": redis_node.url, "local_cache_dir": str(tmp_path),
             "max_local_cpu_size": "64KB", "prefetch_enabled": False, "remote_timeout": 5.0}
    llm = make_llm(tiny_model, extra)
    try:
        run(llm, [COLD_WARM[0]])  # written through to disk and Redis
    finally:
        shutdown(llm)
    for path in glob.glob(str(tmp_path / "*" / "*.lmc")):
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
    llm = make_llm(tiny_model, extra)
    scheduler = core(llm).scheduler
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    try:
        engine = llm.llm_engine
        engine.add_request("bg", {"prompt_token_ids": COLD_WARM[0]}, SAMPLING)
        redis_node.pause()
        threading.Timer(1.5, redis_node.resume).start()
        engine.step()  # asked (found on disk: a background load), the load starts and waits on Redis
        (waiting,) = [r.status.name for r in scheduler.requests.values()]
        in_flight = worker_half().rank.loads_in_flight()
        engine.abort_request(["bg"])
        engine.step()
        held_while_loading = pool.get_num_free_blocks() < free_before
        deadline = time.monotonic() + 30
        while scheduler.has_requests() and time.monotonic() < deadline:
            engine.step()
        assert not scheduler.has_requests(), "the aborted request's blocks were never released"
        assert pool.get_num_free_blocks() == free_before
        after = run(llm, [COLD_WARM[0], COLD_WARM[1]])
        flush_worker()
        assert worker_half().engine.locks_held() == 0
    finally:
        redis_node.resume()
        shutdown(llm)
    assert (waiting, in_flight, held_while_loading) == ("WAITING_FOR_REMOTE_KVS", 1, True)
    assert_same_outputs(reference["cold_warm"][:2], after, "after the aborted background load")
    assert after[0].num_cached_tokens == expected_hit(len(COLD_WARM[0]), CHUNK)
