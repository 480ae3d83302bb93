"""RedisLocks against real redis-server processes: the old calls (acquire, release, held_by_other) between two
engines on a cluster, `claim` (the whole single-flight step in one round trip), the Lua scripts sent as
EVALSHA and loaded again after SCRIPT FLUSH, and the fallback when Redis is down. The commands the servers
ran are read from their own INFO commandstats (which also counts the commands a script runs)."""

import random
import time

import redis.cluster

from lmcache_core.singleflight import ChainedLocks, Grant, LocalLocks
from lmcache_core.tiers.redis_client import RedisClient
from lmcache_core.tiers.redis_locks import RedisLocks, lock_name
from lmcache_core.tiers.redis_tier import head_name
from tests.lmcache_core.redis_helpers import closed_port_url, cluster_url, make_keys, tiers

__all__ = ["tiers"]  # a fixture


def calls(nodes, command: str) -> int:
    """How many times the servers ran `command` (INFO commandstats), summed over `nodes`."""
    return sum(n.client().info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0) for n in nodes)


def test_locks_between_two_engines_on_a_cluster(redis_cluster, redis_cluster_client, tiers):
    a, b = RedisLocks(tiers(cluster_url(redis_cluster))), RedisLocks(tiers(cluster_url(redis_cluster)))
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


def test_claim_busy_or_takes_every_free_key(redis_cluster, redis_cluster_client, tiers):
    a = RedisLocks(RedisClient(cluster_url(redis_cluster), timeout=0.5))  # a client alone, no tier
    b = RedisLocks(tiers(cluster_url(redis_cluster)))
    keys = make_keys(random.Random(20), 12)
    try:
        assert a.claim([], "A", 5.0) == Grant(False, ())
        assert a.claim(keys[:6], "A", 5.0) == Grant(False, (True,) * 6)
        assert b.claim(keys, "B", 5.0) == Grant.refused(12), "keys[0] is A's"
        assert a.held_by_other(keys, "A") == [False] * 12, "B took keys 6..11 in passing and gave them back"
        mixed = keys[6:7] + keys[4:6] + keys[7:]  # 4 and 5 are A's
        assert b.claim(mixed, "B", 5.0) == Grant(False, (True, False, False) + (True,) * 5)
        assert a.claim(keys[:8], "A", 20.0) == Grant(False, (True,) * 6 + (False,) * 2)  # refreshes its own
        assert redis_cluster_client.pttl(lock_name(keys[0])) > 10_000
        assert b.claim(keys[3:4] + keys[6:], "B", 5.0) == Grant.refused(7), "keys[3] is A's"
        assert a.held_by_other(keys[6:], "A") == [False] * 6, "a busy claim leaves B holding none of its keys"
        a.release(keys, None)
        assert b.claim(keys, "B", 5.0) == Grant(False, (True,) * 12)
        assert not a.errors and not b.errors
    finally:
        a.client.close()


def test_claim_is_one_pipeline_of_evalsha_and_survives_script_flush(redis_cluster, redis_cluster_client, tiers):
    masters = redis_cluster.masters()
    locks = RedisLocks(tiers(cluster_url(redis_cluster)))
    keys = make_keys(random.Random(21), 9)
    before = {c: calls(masters, c) for c in ("evalsha", "eval", "script|load")}
    assert locks.claim(keys, "A", 5.0) == Grant(False, (True,) * 9)
    assert calls(masters, "script|load") - before["script|load"] == len(masters), "loaded once per node"
    for _ in range(3):
        assert locks.claim(keys, "A", 5.0).held == (True,) * 9
    after = {c: calls(masters, c) for c in before}
    assert after["evalsha"] - before["evalsha"] == 4 * 9, "one script call per key and claim"
    assert after["script|load"] - before["script|load"] == len(masters), "never loaded again"
    assert after["eval"] == before["eval"], "the script's text is never sent again"

    for node in masters:  # the servers forget every script (as a restart or a failover to a new node would)
        node.client().script_flush()
    locks.release(keys, "A")  # NOSCRIPT on every node: loaded again, retried, done
    assert locks.held_by_other(keys, "B") == [False] * 9, "the releases ran after the reload"
    assert locks.claim(keys, "A", 5.0) == Grant(False, (True,) * 9)
    assert calls(masters, "script|load") - after["script|load"] == 2 * len(masters), "both scripts, each node once"
    assert not locks.errors, dict(locks.errors)


def test_chained_claim_with_redis_gives_back_the_local_grant_when_busy(redis_node, tiers):
    shared = RedisLocks(tiers(redis_node.url))
    one, two = ChainedLocks(LocalLocks(), shared), ChainedLocks(LocalLocks(), RedisLocks(tiers(redis_node.url)))
    keys = make_keys(random.Random(22), 5)
    assert one.claim(keys[:3], "r1", 5.0) == Grant(False, (True,) * 3)
    assert two.claim(keys, "r2", 5.0) == Grant.refused(5), "another instance computes keys[0]"
    assert two.layers[0].held_by_other(keys, "nobody") == [False] * 5, "the local grant was given back"
    assert two.claim([keys[3], keys[2], keys[4]], "r2", 5.0) == Grant(False, (True, False, True))
    assert two.layers[0].held_by_other([keys[3], keys[2], keys[4]], "nobody") == [True, False, True], \
        "refused by Redis: not held locally either"
    assert one.claim(keys, "r3", 5.0) == Grant.refused(5), "busy locally: Redis is not asked"
    assert not shared.errors


def test_locks_fall_back_to_not_held_when_redis_fails(tiers):
    locks = RedisLocks(tiers(closed_port_url()))
    keys = make_keys(random.Random(15), 4)
    assert locks.acquire(keys, "A", 5.0) == [True] * 4  # the engine computes itself: the safe fallback
    assert locks.claim(keys, "A", 5.0) == Grant(False, (True,) * 4)
    assert locks.held_by_other(keys, "A") == [False] * 4
    locks.release(keys, "A")
    assert locks.errors["connection"] == 1 and locks.errors["backoff_skip"] == 3
