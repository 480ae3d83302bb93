"""Faults below the cache never reach the user: a corrupt chunk on disk or in Redis, and Redis going away
while the LLM keeps serving. Outputs stay identical (vLLM recomputes what did not load); nothing is raised.

L2 is smaller than one chunk (64 KB < 128 KiB), so every hit is read from the tier under test, and prefetch
is off, so the corrupt chunk is found by the worker's load (not by a prefetch before the lookup answers).
"""

import os

import pytest
import redis

from tests.connectors.prompts import FAULTS
from tests.connectors.vllm_helpers import (
    assert_same_outputs, connector_totals, core, expected_hit, flush_worker, make_llm, run, shutdown, worker_half,
)

CHUNK = 128
BASE = {"chunk_size": CHUNK, "max_local_cpu_size": "64KB", "prefetch_enabled": False}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _flush() -> None:
    """Every save of the steps so far is in the engine and written to disk or Redis."""
    flush_worker()


def _run_with_corruption(llm, corrupt) -> tuple[list, list, list, int]:
    """Cold run (stores), corrupt chunk 1 of FAULTS[0], warm run (its load fails: recompute), then a run that
    hits everything again (the recomputed chunk was stored anew)."""
    cold = run(llm, FAULTS)
    _flush()
    corrupt(worker_half().engine.keys(FAULTS[0])[1])
    warm = run(llm, FAULTS)
    failed = connector_totals(llm).get("load_failed_tokens", 0)
    _flush()
    again = run(llm, FAULTS)
    return cold, warm, again, failed


def _check(reference, cold, warm, again, failed):
    ref = reference["faults"]
    for what, got in (("cold", cold), ("corrupt chunk", warm), ("after recompute", again)):
        assert_same_outputs(ref, got, what)
    assert failed == expected_hit(len(FAULTS[0]), CHUNK) - CHUNK  # chunk 0 loaded; from chunk 1 on recomputed
    assert [o.num_cached_tokens for o in again] == [expected_hit(len(p), CHUNK) for p in FAULTS]


@pytest.mark.parametrize("mode", [{}, {"async_load": False}], ids=["background-load", "synchronous-load"])
def test_corrupt_chunk_on_disk(tiny_model, reference, tmp_path, mode):
    extra = {**BASE, "local_cache_dir": str(tmp_path), "max_local_cache_size": "1GB", **mode}
    llm = make_llm(tiny_model, extra)

    def corrupt(key):
        path = os.path.join(tmp_path, key.name[33:35], key.name + ".lmc")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(_flip(data, len(data) // 2))

    try:
        assert core(llm).scheduler.recompute_kv_load_failures, "the connector asks vLLM to recompute"
        results = _run_with_corruption(llm, corrupt)
        disk = worker_half().engine.stats()["L3"]
    finally:
        shutdown(llm)
    _check(reference, *results)
    assert disk["corrupt"] == 1


def test_corrupt_chunk_in_redis_then_redis_stopped(tiny_model, reference, redis_node):
    extra = {**BASE, "remote_url": redis_node.url, "remote_timeout": 0.5}
    client = redis.Redis.from_url(redis_node.url)  # raw bytes
    llm = make_llm(tiny_model, extra)

    def corrupt(key):
        name = f"lmc:v1:{{{key.name}}}"
        value = client.get(name)
        client.set(name, _flip(value, len(value) // 2))

    try:
        results = _run_with_corruption(llm, corrupt)
        redis_node.kill()  # the server goes away; this LLM keeps serving
        after_stop = run(llm, FAULTS)
        after_stop_again = run(llm, FAULTS)
        remote = worker_half().engine.stats()["L4"]
    finally:
        shutdown(llm)
    _check(reference, *results)
    assert remote["corrupt"] == 1
    assert_same_outputs(reference["faults"], after_stop, "Redis stopped")
    assert_same_outputs(reference["faults"], after_stop_again, "Redis still stopped")
    assert [o.num_cached_tokens for o in after_stop] == [0] * len(FAULTS)
    assert sum(remote["errors"].values()) > 0
