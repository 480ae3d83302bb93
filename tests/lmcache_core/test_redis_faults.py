"""RedisTier (through its RedisClient) when Redis fails: unreachable from the start, killed and restarted,
paused, a cluster master killed under load and a graceful failover (MOVED); and authentication (password,
ACL user, TLS). Real redis-server processes (tests/redis_servers.py), no mocks.

Timing bounds are loose multiples of what was measured on a 2-core machine (each named where it is
asserted): they bound how long a call may hang on a fault, not how fast the tier is."""

import random
import shutil
import subprocess
import threading
import time

import pytest

from lmcache_core.keys import ChunkKey
from lmcache_core.tiers.backoff import Backoff
from lmcache_core.tiers.redis_client import CONNECT, SERVER
from lmcache_core.tiers.redis_locks import RedisLocks, lock_name
from lmcache_core.tiers.redis_tier import head_name
from tests.lmcache_core.redis_helpers import (INSTANT_S, KiB, PART, SLACK_S, closed_port_url, cluster_url, make_keys,
                                              tiers, timed)
from tests.redis_servers import LOOPBACK, RedisNode, free_port

__all__ = ["tiers"]  # a fixture


# -- faults -------------------------------------------------------------------------------------------------


def test_unreachable_from_start_misses_and_backs_off(tiers):
    rng = random.Random(6)
    timeout = 0.3
    tier = tiers(closed_port_url(), timeout=timeout, backoff=Backoff(0.4, 30))
    locks = RedisLocks(tier)
    keys = make_keys(rng, 8)
    got, first = timed(tier.get, keys)
    assert got == [None] * 8 and first < timeout + SLACK_S
    assert tier.stats.errors["connection"] == 1 and tier.client.backoff.delay(CONNECT) == 0.4
    calls = [timed(tier.contains, keys), timed(tier.put, [(keys[0], b"x")]), timed(tier.get, keys),
             timed(locks.acquire, keys, "A", 5.0), timed(locks.held_by_other, keys, "A")]
    assert [c[0] for c in calls] == [[False] * 8, [False], [None] * 8, [True] * 8, [False] * 8]
    assert max(c[1] for c in calls) < INSTANT_S, [c[1] for c in calls]
    assert tier.stats.errors["backoff_skip"] == 3 and locks.errors["backoff_skip"] == 2
    assert tier.stats.errors["connection"] == 1, "the back-off did not keep calls off the network"
    time.sleep(0.45)
    assert tier.get(keys) == [None] * 8  # the back-off expired: one probe, refused again, delay doubled
    assert tier.stats.errors["connection"] == 2 and tier.client.backoff.delay(CONNECT) == 0.8
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
        assert got == [None] * 6 and took < tier.client.timeout + SLACK_S
        time.sleep(0.1)
    assert tier.stats.errors["connection"] >= 1 and tier.stats.errors["backoff_skip"] >= 5
    assert tier.client.backoff.delay(SERVER) >= 0.5
    redis_node.restart()
    restarted = time.monotonic()
    while tier.put(list(zip(keys, values))) != [True] * 6:  # data died with the process: write again
        assert time.monotonic() - restarted < 5.0, "no recovery 5 s after the restart"
        time.sleep(0.05)
    recovery = time.monotonic() - restarted
    print(f"\nsingle node restart: tier writing again {recovery:.2f} s after the restart")
    assert tier.get(keys) == values and tier.client.backoff.delay(SERVER) == 0  # a success resets the back-off


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
    tier = tiers(cluster_url(cluster), max_part_size=PART, timeout=0.5)
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
    probe = head_name(moved[0])  # where the client's slot map routes it shows the MOVED path really ran
    assert tier.client.node_for(probe) == f"{other.host}:{other.port}", "the map was refreshed before any MOVED"
    errors_before = dict(tier.stats.errors)
    assert moved and tier.get(moved) == [b"v" + k.raw for k in moved]
    assert tier.client.node_for(probe) == f"{promoted.host}:{promoted.port}"
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


