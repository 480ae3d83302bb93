"""CacheEngine with a real Redis (Cluster) as L4: sharing between engines, corruption, outages, failover,
and single-flight across instances."""

import random
import threading
import time

import pytest
import torch

from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.tiers.redis_tier import head_name
from tests.helpers import assert_bytes_equal
from tests.lmcache_core.test_engine_memory import CHUNK_BYTES, CS, SPEC, kv_for, tokens
from tests.redis_servers import LOOPBACK, free_port


def cluster_url(cluster) -> str:
    return "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in cluster.masters())


def redis_engine(url, l2_chunks=2, **cfg):
    cfg.setdefault("chunk_size", CS)
    cfg.setdefault("prefetch_enabled", False)
    cfg.setdefault("remote_timeout", 0.5)
    config = CacheConfig(max_local_cpu_size=f"{l2_chunks * CHUNK_BYTES}B", remote_url=url, **cfg)
    return CacheEngine(config, spec=SPEC, device="cpu")


def test_instances_share_chunks_through_the_cluster(redis_cluster, redis_cluster_client):
    toks, kv = tokens(160), kv_for(160)
    with redis_engine(cluster_url(redis_cluster)) as writer:
        assert writer.store(toks, kv) == 160
    reader = redis_engine(cluster_url(redis_cluster), l2_chunks=1)  # another instance, nothing in memory
    assert reader.lookup(toks) == 160
    n, out = reader.retrieve(toks)
    assert n == 160
    assert_bytes_equal(out, kv, "through Redis Cluster")
    assert reader.stats()["L4"]["hits"] >= 9
    reader.close()


def test_corrupt_value_in_redis_is_a_miss_deleted_and_counted(redis_cluster, redis_cluster_client):
    toks, kv = tokens(64, seed=3), kv_for(64, seed=3)
    with redis_engine(cluster_url(redis_cluster)) as writer:
        writer.store(toks, kv)
        victim = writer.keys(toks)[2]
    name = head_name(victim)
    raw = redis_cluster.client(decode_responses=False)
    value = bytearray(raw.get(name))
    value[-5] ^= 0x01
    raw.set(name, bytes(value))

    reader = redis_engine(cluster_url(redis_cluster), l2_chunks=1)
    n, out = reader.retrieve(toks)
    assert n == 2 * CS
    assert_bytes_equal(out, kv[:, :, :n], "chunks before the corrupt one")
    assert reader.stats()["L4"]["corrupt"] == 1
    assert raw.get(name) is None
    raw.close()
    reader.close()


def test_redis_unreachable_from_the_start_degrades_to_memory_only():
    e = redis_engine(f"redis://{LOOPBACK}:{free_port()}", l2_chunks=8, remote_timeout=0.3)
    toks, kv = tokens(64), kv_for(64)
    t0 = time.monotonic()
    assert e.lookup(toks) == 0
    assert e.store(toks, kv) == 64
    e.flush()
    n, out = e.retrieve(toks)  # served from L2
    assert n == 64
    assert_bytes_equal(out, kv, "memory while Redis is down")
    assert time.monotonic() - t0 < 5
    assert sum(e.stats()["L4"]["errors"].values()) >= 1
    e.close()


def test_redis_stopped_mid_run_then_restarted(redis_node):
    e = redis_engine(redis_node.url, l2_chunks=1, remote_timeout=0.3)
    toks, kv = tokens(48), kv_for(48)
    e.store(toks, kv)
    e.flush()
    redis_node.kill()
    assert e.retrieve(toks)[0] <= CS  # only what L2 still holds; no exception
    redis_node.restart()  # empty: the chunks are gone, the engine recovers after its back-off
    fresh = redis_engine(redis_node.url, l2_chunks=1)
    deadline = time.monotonic() + 40
    while fresh.lookup(toks) < 48:  # storing again refills the restarted server, L2's chunk included
        assert time.monotonic() < deadline, "the Redis tier never recovered"
        e.store(toks, kv)
        e.flush()
        time.sleep(0.2)
    e.close()
    fresh.close()


def test_master_killed_under_load_never_raises_nor_serves_wrong_kv(redis_cluster_replicas):
    url = cluster_url(redis_cluster_replicas)
    engines = [redis_engine(url, l2_chunks=1, remote_timeout=0.5) for _ in range(3)]
    seqs = [tokens(32, seed=s) for s in range(12)]
    kvs = [kv_for(32, seed=s) for s in range(12)]
    stop, errors, served = threading.Event(), [], [0]

    def worker(w):
        e, rng = engines[w], random.Random(w)
        while not stop.is_set():
            i = rng.randrange(12)
            try:
                if rng.random() < 0.3:
                    e.store(seqs[i], kvs[i])
                else:
                    n, out = e.retrieve(seqs[i])
                    if n:
                        assert torch.equal(out.view(torch.int16), kvs[i][:, :, :n].view(torch.int16)), i
                        served[0] += 1
            except Exception as exc:  # any exception reaching the caller fails the test
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        victim = redis_cluster_replicas.masters()[0]
        replicas = redis_cluster_replicas.replicas_of(victim)
        redis_cluster_replicas.kill(victim)
        redis_cluster_replicas.wait_for_failover(victim, replicas)
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert served[0] > 0
    for e in engines:
        e.close()


def test_single_flight_across_two_engines_sharing_redis(redis_cluster, redis_cluster_client):
    url = cluster_url(redis_cluster)
    a, b = redis_engine(url, l2_chunks=8), redis_engine(url, l2_chunks=8)
    toks, kv = tokens(64, seed=11), kv_for(64, seed=11)
    assert a.claim(toks, owner="req-1").state == "compute"
    assert b.claim(toks, owner="req-9").state == "busy"  # another instance is computing these chunks
    threading.Timer(0.1, lambda: a.store(toks, kv)).start()
    claim = b.wait_claim(toks, owner="req-9", timeout=10)
    assert (claim.state, claim.hit_tokens) == ("hit", 64)  # waited, then found A's chunks in Redis
    n, out = b.retrieve(toks)
    assert_bytes_equal(out, kv, "single-flight result")
    a.close()
    b.close()


@pytest.mark.parametrize("redis_node", [{"password": "s3cret"}], indirect=True)
def test_cache_secret_rejects_chunks_written_without_it(redis_node):
    host = redis_node.url.removeprefix("redis://")
    url = f"redis://:s3cret@{host}"
    toks, kv = tokens(32, seed=4), kv_for(32, seed=4)
    with redis_engine(url, cache_secret="team-key") as signer:
        signer.store(toks, kv)
    with redis_engine(url, l2_chunks=1, cache_secret="team-key") as reader:
        n, out = reader.retrieve(toks)
        assert n == 32
        assert_bytes_equal(out, kv, "signed")
    forger = redis_engine(url)  # can write to Redis, lacks the secret
    other = kv_for(32, seed=99)
    forger.tiers.byte_tiers[0].delete(forger.keys(toks))
    forger.store(toks, other)
    forger.close()
    with redis_engine(url, l2_chunks=1, cache_secret="team-key") as reader:
        assert reader.retrieve(toks) == (0, None)  # never the forged bytes
        assert reader.stats()["L4"]["corrupt"] >= 1
