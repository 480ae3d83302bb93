"""Fixtures that start real Redis servers on 127.0.0.1 (helpers in tests/redis_servers.py).

- redis_node: a standalone server, fresh per test. For a password, parametrize indirectly:
  @pytest.mark.parametrize("redis_node", [{"password": "pw"}], indirect=True)
- redis_node_factory: call it (password=...) for as many servers as a test needs.
- redis_cluster: 3 masters, shared by the whole session: do not damage it; redis_cluster_client gives a
  RedisCluster client on it after FLUSHALL on every master.
- redis_cluster_replicas: 3 masters + 3 replicas, fresh per test, yours to kill -9 / SIGSTOP
  (kill, pause, resume, wait_for_failover, restart).
- redis_cluster_factory: call it (masters=, replicas_per_master=, password=, use_cli=) for other shapes.
Everything is killed and its temp dir removed after the test (or the session), whether it passed or not.
No binary: the fixtures fail (never skip) and say to run scripts/ensure_redis.sh.
"""

import pytest

from tests.redis_servers import RedisBinaries, RedisCluster, RedisNode, RedisUnavailable, find_binaries, start_node


@pytest.fixture(scope="session")
def redis_binaries() -> RedisBinaries:
    try:
        return find_binaries()
    except RedisUnavailable as e:
        message = str(e)
    pytest.fail(message, pytrace=False)


@pytest.fixture
def redis_node_factory(redis_binaries):
    started: list[RedisNode] = []

    def make(*, password: str | None = None) -> RedisNode:
        node = start_node(redis_binaries, password=password)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


@pytest.fixture
def redis_node(request, redis_node_factory) -> RedisNode:
    return redis_node_factory(**(getattr(request, "param", None) or {}))


@pytest.fixture
def redis_cluster_factory(redis_binaries):
    started: list[RedisCluster] = []

    def make(masters: int = 3, replicas_per_master: int = 0, **kwargs) -> RedisCluster:
        cluster = RedisCluster(redis_binaries, masters, replicas_per_master, **kwargs)
        started.append(cluster)
        return cluster.start()

    yield make
    for cluster in started:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster(redis_binaries):
    with RedisCluster(redis_binaries, masters=3) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_client(redis_cluster):
    assert redis_cluster.healthy(), "the session's redis_cluster was damaged by an earlier test"
    for node in redis_cluster.masters():
        node.client().flushall()
    client = redis_cluster.client()
    yield client
    client.close()


@pytest.fixture
def redis_cluster_replicas(redis_cluster_factory) -> RedisCluster:
    return redis_cluster_factory(masters=3, replicas_per_master=1)
