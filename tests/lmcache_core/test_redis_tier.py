"""RedisTier against real redis-server processes (tests/redis_servers.py): round trips on a single node, a
unix socket and the session's 3-master cluster, parts and manifests, TTL, damaged parts, clear, and large
values. Faults, failover and authentication: test_redis_faults.py; locks: test_redis_locks.py. No mocks."""

import random
import re
import time

import redis.cluster

from lmcache_core.config import CacheConfig
from lmcache_core.tiers.redis_locks import RedisLocks, lock_name
from lmcache_core.tiers.redis_tier import MANIFEST, RedisTier, head_name, part_name
from tests.lmcache_core.redis_helpers import (EDGE_SIZES, KiB, MiB, PART, cluster_url, make_keys, make_values, parts_of,
                                              tiers)

__all__ = ["tiers"]  # a fixture
NAME_RE = re.compile(rb"^lmc:v1:\{[0-9a-f]{32}-[0-9a-f]{32}\}(:p\d+)?$")


# -- round trips --------------------------------------------------------------------------------------------


def test_round_trip_single_node_parts_are_separate_keys(redis_node, tiers):
    rng = random.Random(1)
    tier = tiers(redis_node.url, max_part_size=PART)
    keys, values = make_keys(rng, 40), make_values(rng, 40)
    assert tier.put(list(zip(keys, values))) == [True] * 40
    absent = make_keys(rng, 5)
    got = tier.get(keys + absent)
    assert got[:40] == values and got[40:] == [None] * 5
    assert tier.contains(keys + absent) == [True] * 40 + [False] * 5
    s = tier.stats
    assert (s.hits, s.misses, s.bytes_read, s.bytes_written) == (40, 5, sum(map(len, values)), sum(map(len, values)))
    assert not s.errors

    raw = redis_node.client(decode_responses=False)
    for key, value in zip(keys, values):
        split = len(value) > PART or len(value) == MANIFEST.size
        want_parts = max(1, -(-len(value) // PART)) if split else 0
        assert parts_of(raw, key) == want_parts, (len(value), want_parts)
        if split:
            assert raw.strlen(head_name(key)) == MANIFEST.size
            assert [raw.strlen(part_name(key, p)) for p in range(want_parts)] == \
                [min(PART, len(value) - p * PART) for p in range(want_parts)]
    assert parts_of(raw, keys[EDGE_SIZES.index(300 * KiB)]) == 5
    names = raw.keys("*")
    assert names and all(NAME_RE.match(n) for n in names), [n for n in names if not NAME_RE.match(n)][:3]

    u = tier.usage()
    assert (u.used_bytes, u.capacity_bytes, u.entries) == (sum(map(len, values)), 0, 40)
    assert tier.put(list(zip(keys[:5], values[:5]))) == [True] * 5  # rewriting present chunks counts once
    assert tier.usage().entries == 40
    big = EDGE_SIZES.index(300 * KiB)
    tier.delete([keys[big], keys[0], absent[0]])
    assert tier.get([keys[big], keys[0], keys[1]]) == [None, None, values[1]]
    assert parts_of(raw, keys[big]) == 0, "delete left parts behind"
    u = tier.usage()
    assert (u.used_bytes, u.entries) == (sum(map(len, values)) - len(values[big]), 38)


def test_unix_socket_url_and_from_config(redis_node, tiers):
    cfg = CacheConfig(remote_url=f"unix://{redis_node.unix_socket}", remote_ttl=0, remote_timeout=0.5,
                      remote_max_part_size="1MiB", batch_size=4)
    tier = RedisTier.from_config(cfg)
    try:
        assert (tier.ttl, tier.client.timeout, tier.max_part_size, tier.client.batch_size) == (0, 0.5, MiB, 4)
        rng = random.Random(2)
        keys, values = make_keys(rng, 10), [rng.randbytes(rng.randrange(3 * MiB)) for _ in range(10)]
        assert tier.put(list(zip(keys, values))) == [True] * 10  # 10 chunks in batches of 4
        assert tier.get(keys) == values and not tier.is_cluster
        assert redis_node.client().pttl(head_name(keys[0])) == -1  # remote_ttl 0: no expiry
    finally:
        tier.close()
        tier.close()  # idempotent


def test_round_trip_cluster_parts_share_a_slot_chunks_spread(redis_cluster, redis_cluster_client, tiers):
    rng = random.Random(3)
    tier = tiers(cluster_url(redis_cluster), max_part_size=PART)
    keys, values = make_keys(rng, 90), make_values(rng, 90)
    assert tier.put(list(zip(keys, values))) == [True] * 90
    assert tier.get(keys) == values and tier.is_cluster and not tier.stats.errors

    heads_per_master = {m.port: 0 for m in redis_cluster.masters()}
    for key, value in zip(keys, values):
        master = redis_cluster.master_for_key(head_name(key))
        heads_per_master[master.port] += 1
        n = parts_of(master.client(), key)  # asked of the head's own master: parts live there
        split = len(value) > PART or len(value) == MANIFEST.size
        assert n == (max(1, -(-len(value) // PART)) if split else 0)
        slot = redis.cluster.key_slot(head_name(key).encode())
        assert {redis.cluster.key_slot(part_name(key, p).encode()) for p in range(n)} <= {slot}
    assert len(heads_per_master) == 3 and min(heads_per_master.values()) >= 10, heads_per_master

    detected = tiers(redis_cluster.nodes[1].url, max_part_size=PART)  # plain redis:// URL of one master
    assert detected.get(keys) == values and detected.is_cluster


def test_ttl_expires_heads_and_parts(redis_node, tiers):
    rng = random.Random(4)
    tier = tiers(redis_node.url, max_part_size=PART, ttl=1)
    keys, values = make_keys(rng, 2), [rng.randbytes(100), rng.randbytes(200 * KiB)]
    assert tier.put(list(zip(keys, values))) == [True, True]
    raw = redis_node.client()
    ttls = [raw.pttl(head_name(keys[0])), raw.pttl(head_name(keys[1]))] + [raw.pttl(part_name(keys[1], p))
                                                                           for p in range(4)]
    assert all(500 < t <= 1000 for t in ttls), ttls
    time.sleep(1.5)
    assert tier.get(keys) == [None, None] and tier.contains(keys) == [False, False]
    assert raw.dbsize() == 0


def test_head_without_a_whole_part_is_a_miss(redis_node, tiers):
    rng = random.Random(5)
    tier = tiers(redis_node.url, max_part_size=PART)
    keys, values = make_keys(rng, 4), [rng.randbytes(300 * KiB) for _ in range(4)]
    assert tier.put(list(zip(keys, values))) == [True] * 4
    raw = redis_node.client(decode_responses=False)
    raw.delete(part_name(keys[0], 2))  # a part gone (expired first, evicted, deleted)
    raw.set(part_name(keys[1], 4), raw.get(part_name(keys[1], 4))[:-1])  # a short part
    same_length = bytearray(raw.get(part_name(keys[2], 1)))
    same_length[7] ^= 1
    raw.set(part_name(keys[2], 1), bytes(same_length))  # a part from another write of the chunk
    assert tier.get(keys) == [None, None, None, values[3]]
    assert tier.stats.errors["incomplete"] == 3 and tier.stats.misses == 3
    assert tier.contains(keys[:1]) == [True]  # contains is the cheap head check; get is the truth


# -- clear --------------------------------------------------------------------------------------------------


def test_clear_removes_only_our_chunks(redis_cluster, redis_cluster_client, tiers):
    tier = tiers(cluster_url(redis_cluster), max_part_size=PART)
    rng = random.Random(16)
    keys, values = make_keys(rng, 40), make_values(rng, 40)
    assert tier.put(list(zip(keys, values))) == [True] * 40
    foreign = {f"user:{i}": f"v{i}" for i in range(30)} | {"lmc:v2:other": "x", "lmc:v1": "y"}
    for name, value in foreign.items():
        redis_cluster_client.set(name, value)
    RedisLocks(tier).acquire(keys[:3], "A", 30.0)
    tier.clear()
    for master in redis_cluster.masters():
        assert not list(master.client().scan_iter(match="lmc:v1:*")), f"port {master.port} kept chunks"
    assert {n: redis_cluster_client.get(n) for n in foreign} == foreign
    assert all(redis_cluster_client.exists(lock_name(k)) for k in keys[:3])
    assert tier.get(keys) == [None] * 40 and tier.usage().entries == 0 and tier.usage().used_bytes == 0


def test_large_values_through_a_node_and_the_cluster_come_back_exact(redis_node, redis_cluster, redis_cluster_client,
                                                                     tiers):
    """64 x 1 MiB values through one server, and through the cluster with its per-node pipelines on threads
    and one after another: the same bytes back and counters that say so. Speed: `python -m bench.tiers`."""
    rng = random.Random(17)
    n = 64
    keys, values = make_keys(rng, n), [rng.randbytes(MiB) for _ in range(n)]
    slow_ok = 10.0  # a timeout for correctness only: 64 MiB pipelines on a loaded 2-core box
    made = [tiers(redis_node.url, timeout=slow_ok), tiers(cluster_url(redis_cluster), batch_size=n, timeout=slow_ok),
            tiers(cluster_url(redis_cluster), batch_size=n, threads=1, timeout=slow_ok)]
    for tier in made:
        assert tier.put(list(zip(keys, values))) == [True] * n
        assert tier.get(keys) == values
        s = tier.stats
        assert (s.hits, s.misses, s.bytes_read, s.bytes_written) == (n, 0, n * MiB, n * MiB) and not s.errors
    assert [t.usage().entries for t in made] == [n, n, 0], "the serial tier found the chunks already there"
    assert [t.is_cluster for t in made] == [False, True, True]
    raw = redis_node.client(decode_responses=False)
    assert [raw.get(head_name(k)) for k in keys[:4]] == values[:4]
    spread = {redis_cluster.master_for_key(head_name(k)).port for k in keys}
    assert len(spread) == 3, "64 chunks land on every master"
