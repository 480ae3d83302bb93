"""RedisTier and RedisLocks against real redis-server processes (tests/redis_servers.py): a single node,
the session's 3-master cluster, and a fresh 3+3 cluster whose master is killed under load. No mocks.

Timing bounds are loose multiples of what was measured on a 2-core machine (each named where it is
asserted); the throughput test prints its figures (run with -s to see them).
"""

import random
import re
import shutil
import statistics
import subprocess
import threading
import time

import pytest
import redis
import redis.cluster

from lmcache_core.config import CacheConfig
from lmcache_core.keys import ChunkKey
from lmcache_core.tiers.backoff import Backoff
from lmcache_core.tiers.redis_locks import RedisLocks, lock_name
from lmcache_core.tiers.redis_tier import CONNECT, MANIFEST, SERVER, RedisTier, head_name, part_name
from tests.redis_servers import LOOPBACK, RedisNode, free_port

KiB, MiB = 2**10, 2**20
PART = 64 * KiB
SLACK_S = 0.5  # scheduling slack on a loaded 2-core CI box, on top of the timeout being tested
INSTANT_S = 0.05  # a call answered from the back-off (measured < 1 ms)
NAME_RE = re.compile(rb"^lmc:v1:\{[0-9a-f]{32}-[0-9a-f]{32}\}(:p\d+)?$")


def make_keys(rng: random.Random, n: int) -> list[ChunkKey]:
    return [ChunkKey(rng.randbytes(16), rng.randbytes(16)) for _ in range(n)]


# sizes around every boundary: empty, the manifest's own length, the part size, several parts
EDGE_SIZES = [0, 1, MANIFEST.size - 1, MANIFEST.size, MANIFEST.size + 1, PART - 1, PART, PART + 1, 300 * KiB]


def make_values(rng: random.Random, n: int) -> list[bytes]:
    sizes = EDGE_SIZES + [rng.randrange(0, 400 * KiB) for _ in range(n - len(EDGE_SIZES))]
    return [rng.randbytes(s) for s in sizes[:n]]


@pytest.fixture
def tiers():
    made: list[RedisTier] = []

    def make(url, **kwargs) -> RedisTier:
        kwargs.setdefault("timeout", 0.5)
        tier = RedisTier(url, **kwargs)
        made.append(tier)
        return tier

    yield make
    for tier in made:
        tier.close()


def closed_port_url() -> str:
    return f"redis://{LOOPBACK}:{free_port()}"  # nothing listens there: connection refused


def parts_of(client, key: ChunkKey) -> int:
    """How many consecutive part keys exist for `key` (checked one past the last)."""
    n = 0
    while client.exists(part_name(key, n)):
        n += 1
    return n


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
        assert (tier.ttl, tier.timeout, tier.max_part_size, tier.batch_size) == (0, 0.5, MiB, 4)
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
    seeds = ",".join(f"{n.host}:{n.port}" for n in redis_cluster.nodes)
    tier = tiers(f"redis-cluster://{seeds}", max_part_size=PART)
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


# -- faults -------------------------------------------------------------------------------------------------


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - t0


def test_unreachable_from_start_misses_and_backs_off(tiers):
    rng = random.Random(6)
    timeout = 0.3
    tier = tiers(closed_port_url(), timeout=timeout, backoff=Backoff(0.4, 30))
    locks = RedisLocks(tier)
    keys = make_keys(rng, 8)
    got, first = timed(tier.get, keys)
    assert got == [None] * 8 and first < timeout + SLACK_S
    assert tier.stats.errors["connection"] == 1 and tier.backoff.delay(CONNECT) == 0.4
    calls = [timed(tier.contains, keys), timed(tier.put, [(keys[0], b"x")]), timed(tier.get, keys),
             timed(locks.acquire, keys, "A", 5.0), timed(locks.held_by_other, keys, "A")]
    assert [c[0] for c in calls] == [[False] * 8, [False], [None] * 8, [True] * 8, [False] * 8]
    assert max(c[1] for c in calls) < INSTANT_S, [c[1] for c in calls]
    assert tier.stats.errors["backoff_skip"] == 3 and locks.errors["backoff_skip"] == 2
    assert tier.stats.errors["connection"] == 1, "the back-off did not keep calls off the network"
    time.sleep(0.45)
    assert tier.get(keys) == [None] * 8  # the back-off expired: one probe, refused again, delay doubled
    assert tier.stats.errors["connection"] == 2 and tier.backoff.delay(CONNECT) == 0.8
    tier.delete(keys)
    tier.clear()
    assert tier.usage().entries == 0 and tier.stats.misses == 24  # three gets of 8
    seeds = ",".join(f"{LOOPBACK}:{free_port()}" for _ in range(3))
    cluster = tiers(f"redis-cluster://{seeds}", timeout=timeout)
    (got, first), (again, second) = timed(cluster.get, keys), timed(cluster.get, keys)
    assert got == again == [None] * 8 and first < timeout + SLACK_S and second < INSTANT_S
    assert cluster.stats.errors == {"connection": 1, "backoff_skip": 1}


def test_server_killed_then_restarted_recovers(redis_node, tiers):
    rng = random.Random(7)
    tier = tiers(redis_node.url, max_part_size=PART)
    keys, values = make_keys(rng, 6), [rng.randbytes(150 * KiB) for _ in range(6)]
    assert tier.put(list(zip(keys, values))) == [True] * 6
    redis_node.kill()
    for _ in range(10):
        got, took = timed(tier.get, keys)
        assert got == [None] * 6 and took < tier.timeout + SLACK_S
        time.sleep(0.1)
    assert tier.stats.errors["connection"] >= 1 and tier.stats.errors["backoff_skip"] >= 5
    assert tier.backoff.delay(SERVER) >= 0.5
    redis_node.restart()
    restarted = time.monotonic()
    while tier.put(list(zip(keys, values))) != [True] * 6:  # data died with the process: write again
        assert time.monotonic() - restarted < 5.0, "no recovery 5 s after the restart"
        time.sleep(0.05)
    recovery = time.monotonic() - restarted
    print(f"\nsingle node restart: tier writing again {recovery:.2f} s after the restart")
    assert tier.get(keys) == values and tier.backoff.delay(SERVER) == 0  # a success resets the back-off


def test_paused_server_calls_return_within_the_timeout(redis_node, tiers):
    rng = random.Random(8)
    timeout = 0.3
    tier = tiers(redis_node.url, timeout=timeout, max_part_size=PART, backoff=Backoff(0.3, 30))
    keys, values = make_keys(rng, 4), [rng.randbytes(100 * KiB) for _ in range(4)]
    assert tier.put(list(zip(keys, values))) == [True] * 4
    redis_node.pause()
    try:
        got, took = timed(tier.get, keys)
        assert got == [None] * 4 and took < timeout + SLACK_S, took
        assert tier.stats.errors["timeout"] == 1
        stored, took = timed(tier.put, list(zip(keys, values)))
        assert stored == [False] * 4 and took < INSTANT_S, took  # inside the back-off
        time.sleep(0.35)
        stored, took = timed(tier.put, list(zip(keys, values)))  # the probe: times out again
        assert stored == [False] * 4 and took < timeout + SLACK_S, took
        assert tier.stats.errors["timeout"] == 2
    finally:
        redis_node.resume()
    deadline = time.monotonic() + 3.0
    while tier.get(keys) != values:
        assert time.monotonic() < deadline, "no recovery within 3 s of SIGCONT"
        time.sleep(0.05)


def test_cluster_master_killed_under_load(redis_cluster_replicas, tiers):
    cluster = redis_cluster_replicas
    rng = random.Random(9)
    seeds = ",".join(f"{n.host}:{n.port}" for n in cluster.nodes)
    tier = tiers(f"redis-cluster://{seeds}", max_part_size=PART, timeout=0.5)
    expected = dict(zip(make_keys(rng, 150), [rng.randbytes(rng.randrange(1, 160 * KiB)) for _ in range(150)]))
    pool = list(expected)
    stop = threading.Event()
    failures: list[BaseException] = []
    wrong: list[ChunkKey] = []
    hits_seen = [0]

    def worker(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                batch = r.sample(pool, 8)
                tier.put([(k, expected[k]) for k in batch])
                batch = r.sample(pool, 16)
                for k, v in zip(batch, tier.get(batch)):
                    if v is not None:
                        hits_seen[0] += 1
                        if v != expected[k]:
                            wrong.append(k)
                if r.random() < 0.1:
                    tier.contains(batch)
        except BaseException as e:  # noqa: BLE001 - any exception reaching the caller fails the test
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.7)
        assert hits_seen[0] > 0 and not failures
        victim = cluster.master_for_key(head_name(pool[0]))
        replicas = cluster.replicas_of(victim)
        failover_done: list[float] = []
        killed = time.monotonic()
        cluster.kill(victim)
        watcher = threading.Thread(target=lambda: (cluster.wait_for_failover(victim, replicas, timeout=30),
                                                   failover_done.append(time.monotonic() - killed)), daemon=True)
        watcher.start()
        probe_rng = random.Random(10)
        while True:  # fresh chunks on every shard, written and read back whole
            probe = make_keys(probe_rng, 24)
            data = [probe_rng.randbytes(100 * KiB) for _ in probe]
            if tier.put(list(zip(probe, data))) == [True] * 24 and tier.get(probe) == data:
                break
            assert time.monotonic() - killed < 25.0, f"hit rate did not recover; errors {tier.stats.errors}"
            time.sleep(0.05)
        recovered = time.monotonic() - killed
        watcher.join(30)
        time.sleep(0.5)  # more load on the new topology
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    print(f"\ncluster failover: replica promoted after {failover_done[0] if failover_done else float('nan'):.2f} s, "
          f"tier hit rate back to 100% after {recovered:.2f} s; errors {dict(tier.stats.errors)}")
    assert not failures, failures[:3]
    assert not wrong, f"{len(wrong)} gets returned bytes other than those put"
    assert failover_done, "the cluster did not fail over"
    assert recovered < failover_done[0] + 3.0  # slot map refreshed within REFRESH_S + back-off of the probe
    assert set(tier.stats.errors) <= {"connection", "timeout", "response", "backoff_skip"}
    assert tier.stats.errors["connection"] + tier.stats.errors["timeout"] >= 1
    last = make_keys(probe_rng, 60)
    assert tier.put([(k, b"v" + k.raw) for k in last]) == [True] * 60
    assert tier.get(last) == [b"v" + k.raw for k in last]

    # A graceful failover (CLUSTER FAILOVER on a replica) of another shard: nothing fails, so the tier's
    # slot map goes stale and the old master answers MOVED; the tier must refresh and retry.
    other, promoted = next((m, r) for m in cluster.masters() for r in cluster.replicas_of(m) if r.alive)
    moved = [k for k in last if cluster.master_for_key(head_name(k)).port == other.port]
    promoted.client().execute_command("CLUSTER", "FAILOVER")
    deadline = time.monotonic() + 15
    while not (cluster.role(promoted) == "master" and cluster.role(other) == "slave" and cluster.healthy()):
        assert time.monotonic() < deadline, "CLUSTER FAILOVER did not complete"
        time.sleep(0.05)
    slot = redis.cluster.key_slot(head_name(moved[0]).encode())
    nodes = tier._client.nodes_manager  # redis-py's slot map, read to show the MOVED path really ran
    assert nodes.get_node_from_slot(slot).port == other.port, "the map was refreshed before any MOVED"
    errors_before = dict(tier.stats.errors)
    assert moved and tier.get(moved) == [b"v" + k.raw for k in moved]
    assert nodes.get_node_from_slot(slot).port == promoted.port
    assert dict(tier.stats.errors) == errors_before, "a MOVED reply must be followed, not counted as a fault"


# -- authentication -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("redis_node", [{"password": "s3cret"}], indirect=True)
def test_password_from_url(redis_node, tiers):
    rng = random.Random(11)
    keys, values = make_keys(rng, 3), [rng.randbytes(70 * KiB) for _ in range(3)]
    good = tiers(f"redis://:s3cret@{redis_node.host}:{redis_node.port}", max_part_size=PART)
    assert good.put(list(zip(keys, values))) == [True] * 3 and good.get(keys) == values
    for url in (f"redis://:wrong@{redis_node.host}:{redis_node.port}", redis_node.url):  # wrong, none
        bad = tiers(url)
        assert bad.get(keys) == [None] * 3 and bad.put([(keys[0], b"x")]) == [False]
        assert bad.stats.errors["auth"] == 1 and bad.stats.errors["backoff_skip"] == 1
    assert good.get(keys) == values


def test_acl_user_from_url(redis_node, tiers):
    admin = redis_node.client()
    # only our key space, and no INFO: cluster detection must cope with a user that may not run it
    admin.acl_setuser("lmc", enabled=True, passwords=["+pw2"], keys=["lmc:*"], commands=["+@all", "-info"])
    rng = random.Random(12)
    keys, values = make_keys(rng, 3), [rng.randbytes(90 * KiB) for _ in range(3)]
    tier = tiers(f"redis://lmc:pw2@{redis_node.host}:{redis_node.port}", max_part_size=PART)
    assert tier.put(list(zip(keys, values))) == [True] * 3 and tier.get(keys) == values
    assert RedisLocks(tier).acquire(keys, "A", 5.0) == [True] * 3
    assert admin.get(lock_name(keys[0])) == "A"
    assert "user=lmc" in admin.execute_command("CLIENT", "LIST")
    wrong = tiers(f"redis://lmc:nope@{redis_node.host}:{redis_node.port}")
    assert wrong.get(keys) == [None] * 3 and wrong.stats.errors["auth"] == 1


def test_tls_rediss_url(redis_binaries, tmp_path, tiers):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a test CA")
    ca, crt, key = (str(tmp_path / n) for n in ("ca.crt", "server.crt", "server.key"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=tmp_path)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", ca, "-days", "1", "-subj", "/CN=lmcache-test-ca")
    run("req", *ec, "-keyout", key, "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", ca, "-CAkey", "ca.key", "-CAcreateserial", "-out", crt,
        "-days", "1", "-extfile", "san.ext")
    tls_port = free_port()

    class TLSNode(RedisNode):
        def _args(self):
            return super()._args() + ["--tls-port", str(tls_port), "--tls-cert-file", crt, "--tls-key-file", key,
                                      "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]

    node = TLSNode(redis_binaries, tmp_path / "node")
    try:
        try:
            node.start()
        except RuntimeError as e:
            if "tls" in str(e).lower():
                pytest.skip(f"this redis-server has no TLS: {e}")
            raise
        rng = random.Random(13)
        keys, values = make_keys(rng, 3), [rng.randbytes(100 * KiB) for _ in range(3)]
        tier = tiers(f"rediss://127.0.0.1:{tls_port}?ssl_ca_certs={ca}&ssl_cert_reqs=required", max_part_size=PART)
        assert tier.put(list(zip(keys, values))) == [True] * 3 and tier.get(keys) == values
        untrusted = tiers(f"rediss://127.0.0.1:{tls_port}?ssl_cert_reqs=required")  # system CAs only
        assert untrusted.get(keys) == [None] * 3 and untrusted.stats.errors["connection"] == 1
    finally:
        node.stop()


# -- single-flight locks ------------------------------------------------------------------------------------


def test_locks_between_two_engines_on_a_cluster(redis_cluster, redis_cluster_client, tiers):
    seeds = ",".join(f"{n.host}:{n.port}" for n in redis_cluster.nodes)
    a, b = RedisLocks(tiers(f"redis-cluster://{seeds}")), RedisLocks(tiers(f"redis-cluster://{seeds}"))
    keys = make_keys(random.Random(14), 30)
    assert len({redis_cluster.master_for_key(lock_name(k)).port for k in keys}) == 3
    assert all(redis.cluster.key_slot(lock_name(k).encode()) == redis.cluster.key_slot(head_name(k).encode())
               for k in keys)
    assert a.acquire(keys[:20], "A", 1.0) == [True] * 20
    assert b.held_by_other(keys, "B") == [True] * 20 + [False] * 10
    assert a.held_by_other(keys, "A") == [False] * 30
    assert b.acquire(keys, "B", 5.0) == [False] * 20 + [True] * 10
    b.release(keys[:20], "B")  # not B's: nothing happens
    assert b.held_by_other(keys[:20], "B") == [True] * 20
    assert a.acquire(keys[:20], "A", 20.0) == [True] * 20  # re-entrant, and the TTL is refreshed
    assert redis_cluster_client.pttl(lock_name(keys[0])) > 10_000
    a.release(keys[:20], "A")
    assert b.acquire(keys[:20], "B", 5.0) == [True] * 20
    a.release(keys[20:], None)  # unconditional: the chunks were stored, nobody needs to compute them
    assert a.held_by_other(keys, "A") == [True] * 20 + [False] * 10
    b.release(keys, "B")
    assert a.acquire(keys[:5], "crashed", 0.3) == [True] * 5  # an owner that never releases
    assert b.acquire(keys[:5], "B", 5.0) == [False] * 5
    time.sleep(0.45)
    assert b.acquire(keys[:5], "B", 5.0) == [True] * 5
    assert not a.errors and not b.errors


def test_locks_fall_back_to_not_held_when_redis_fails(tiers):
    locks = RedisLocks(tiers(closed_port_url()))
    keys = make_keys(random.Random(15), 4)
    assert locks.acquire(keys, "A", 5.0) == [True] * 4  # the engine computes itself: the safe fallback
    assert locks.held_by_other(keys, "A") == [False] * 4
    locks.release(keys, "A")
    assert locks.errors["connection"] == 1 and locks.errors["backoff_skip"] == 2


# -- clear --------------------------------------------------------------------------------------------------


def test_clear_removes_only_our_chunks(redis_cluster, redis_cluster_client, tiers):
    seeds = ",".join(f"{n.host}:{n.port}" for n in redis_cluster.nodes)
    tier = tiers(f"redis-cluster://{seeds}", max_part_size=PART)
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


# -- throughput (figures printed; bounds loose) -------------------------------------------------------------


def test_throughput_vs_raw_redis_py(redis_node, redis_cluster, redis_cluster_client, tiers):
    """MB/s of 64 x 1 MiB values, each variant timed in turn over 3 interleaved rounds (median): the tier
    against plain redis-py pipelines on one connection, and the cluster's per-node reads against redis-py's
    ClusterPipeline. Run with -s to see the table."""
    rng = random.Random(17)
    n = 64
    keys, values = make_keys(rng, n), [rng.randbytes(MiB) for _ in range(n)]
    names = [head_name(k) for k in keys]
    raw = redis_node.client(decode_responses=False)
    cluster_raw = redis_cluster.client(decode_responses=False)
    seeds = ",".join(f"{n.host}:{n.port}" for n in redis_cluster.nodes)
    single = tiers(redis_node.url)
    parallel = tiers(f"redis-cluster://{seeds}", batch_size=n)
    serial = tiers(f"redis-cluster://{seeds}", batch_size=n, threads=1)

    def pipelined(client, command, *columns, check=None):
        def go():
            pipe = client.pipeline(transaction=False) if client is raw else client.pipeline()
            for args in zip(*columns):
                pipe.execute_command(command, *args)
            replies = pipe.execute()
            assert check is None or replies == check
        return go

    def reads_back(tier):
        return lambda: tier.get(keys) == values or pytest.fail(f"{tier.name}: bytes differ")

    variants = {
        "node: redis-py pipeline SET (1 connection)": pipelined(raw, "SET", names, values),
        "node: tier put": lambda: single.put(list(zip(keys, values))),
        "node: redis-py pipeline GET (1 connection)": pipelined(raw, "GET", names, check=values),
        "node: tier get": reads_back(single),
        "cluster: tier put": lambda: parallel.put(list(zip(keys, values))),
        "cluster: redis-py ClusterPipeline GET": pipelined(cluster_raw, "GET", names, check=values),
        "cluster: tier get, per-node pipelines, threads": reads_back(parallel),
        "cluster: tier get, per-node pipelines, serial": reads_back(serial),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    cluster_raw.close()
    fig = {k: n * MiB / statistics.median(v) / 1e6 for k, v in times.items()}
    width = max(map(len, fig))
    print("\nMB/s, 64 x 1 MiB values, median of 3 interleaved rounds:\n"
          + "\n".join(f"  {k:<{width}} {v:7.0f}" for k, v in fig.items()))
    # loose: the tier adds routing and bookkeeping, no copies; measured 0.8-1.2x raw on a 2-core box
    assert fig["node: tier get"] > 0.4 * fig["node: redis-py pipeline GET (1 connection)"]
    assert fig["node: tier put"] > 0.4 * fig["node: redis-py pipeline SET (1 connection)"]
