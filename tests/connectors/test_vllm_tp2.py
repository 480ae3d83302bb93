"""Tensor parallelism 2 (`distributed_executor_backend="mp"`: each rank in its own worker process, the scheduler
in this one): the scheduler sees both ranks' caches through the lookup channel, a chunk counts only when both
ranks hold it, and each rank keys its own slice (its KV heads) apart from the other's.

vLLM's CPU backend needs one OpenMP core list per rank (`VLLM_CPU_OMP_THREADS_BIND="0|1"` on this
one-NUMA-node machine); the tiny Llama has 2 KV heads, one per rank. vLLM's own prefix cache is off, so every
reused token comes from ours. Float32; the reference is the same TP=2 setup without the connector.
"""

import json
import socket
import urllib.request
from collections import Counter

import pytest

from tests.connectors.prompts import COLD_WARM
from tests.connectors.vllm_helpers import (
    assert_same_outputs, connector_totals, expected_hit, make_llm, run, shutdown,
)

CHUNK = 128
TP2 = dict(tensor_parallel_size=2, distributed_executor_backend="mp")


@pytest.fixture
def tp2_env(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")


@pytest.fixture
def tp2_reference(tiny_model, tp2_env):
    llm = make_llm(tiny_model, connector=False, **TP2)
    try:
        return run(llm, COLD_WARM)
    finally:
        shutdown(llm)


def _full_chunk_tokens(prompts) -> int:
    return sum(len(p) // CHUNK * CHUNK for p in prompts)


def _two_free_ports() -> int:
    """A port p with p and p + 1 free a moment ago (each worker rank serves on metrics_port + its rank)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", base + 1))
                    return base
                except OSError:
                    continue
    raise RuntimeError("no two consecutive free ports")


def _entries(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("lmcache_tier_entries{"))


def test_tp2_second_run_loads_from_both_ranks_l2(tiny_model, tp2_reference):
    port = _two_free_ports()
    llm = make_llm(tiny_model, {"chunk_size": CHUNK, "max_local_cpu_size": "64MB", "metrics_port": port}, **TP2)
    try:
        cold = run(llm, COLD_WARM)
        before = connector_totals(llm)
        warm = run(llm, COLD_WARM)
        totals = {k: v - before.get(k, 0) for k, v in connector_totals(llm).items()}
        per_rank = [_entries(port), _entries(port + 1)]  # each worker's own engine, on its own port
    finally:
        shutdown(llm)
    assert per_rank == [_full_chunk_tokens(COLD_WARM) // CHUNK] * 2
    assert_same_outputs(tp2_reference, cold, "TP=2 cold")
    assert_same_outputs(tp2_reference, warm, "TP=2 warm")
    expected = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert [o.num_cached_tokens for o in warm] == expected
    # counted once per request, not once per rank
    assert totals["loaded_tokens"] == sum(expected) >= 0.9 * _full_chunk_tokens(COLD_WARM)
    assert totals["hit_tokens"] == totals["lookup_tokens"] == _full_chunk_tokens(COLD_WARM)
    assert totals["requests"] == len(COLD_WARM) and not totals.get("load_failed_tokens")


def test_tp2_across_instances_through_a_redis_cluster_with_one_ranks_chunk_corrupted(
        tiny_model, tp2_reference, redis_cluster, redis_cluster_client):
    """Instance A stores through a real 3-master Redis Cluster; instance B (nothing local: an L2 smaller than
    a chunk) loads A's chunks. Then one chunk of one rank is corrupted: that rank's load fails from there,
    vLLM recomputes, outputs stay identical."""
    url = "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in redis_cluster.masters())
    base = {"chunk_size": CHUNK, "remote_url": url, "cache_salt": "tp2-redis", "prefetch_enabled": False}
    llm = make_llm(tiny_model, {**base, "max_local_cpu_size": "64MB"}, **TP2)
    try:
        first = run(llm, COLD_WARM)
    finally:
        shutdown(llm)  # waits for the writes to Redis
    names = list(redis_cluster_client.scan_iter("lmc:v1:*"))
    by_rank = Counter(name.split("{")[1].split("-")[0] for name in names)  # the key's spec fingerprint
    assert len(by_rank) == 2 and set(by_rank.values()) == {_full_chunk_tokens(COLD_WARM) // CHUNK}

    remote_only = {**base, "max_local_cpu_size": "64KB"}
    llm = make_llm(tiny_model, remote_only, **TP2)
    try:
        second = run(llm, COLD_WARM)
        loaded = connector_totals(llm)["loaded_tokens"]
    finally:
        shutdown(llm)
    expected = [expected_hit(len(p), CHUNK) for p in COLD_WARM]
    assert_same_outputs(tp2_reference, first, "instance A")
    assert_same_outputs(tp2_reference, second, "instance B, from Redis")
    assert [o.num_cached_tokens for o in second] == expected and loaded == sum(expected)

    rank = sorted(by_rank)[1]
    victim = sorted(n for n in names if n.split("{")[1].startswith(rank))[0]
    raw = redis_cluster.client(decode_responses=False)  # chunk values are bytes
    value = raw.get(victim)
    raw.set(victim, value[:-1] + bytes([value[-1] ^ 0xFF]))
    raw.close()
    llm = make_llm(tiny_model, remote_only, **TP2)
    try:
        third = run(llm, COLD_WARM)
        totals = connector_totals(llm)
    finally:
        shutdown(llm)
    assert_same_outputs(tp2_reference, third, "one rank's chunk corrupted")
    assert totals["load_failed_tokens"] > 0, json.dumps(totals)
    assert totals["loaded_tokens"] + totals["load_failed_tokens"] == sum(expected)
