"""Single-flight locks across engine instances that share a Redis (implements `singleflight.Locks`).

A lock is the key `lmc:lock:{<key.name>}` (the chunk's own hash tag: the lock lives on the chunk's slot)
holding the owner's token, with a millisecond expiry, so a crashed owner blocks others for at most `ttl`.
Each key is one small Lua script call (one key, one slot: valid in a cluster, pipelined per node), sent as
EVALSHA (`RedisClient.script`: loaded once per node, again after a NOSCRIPT): take = `SET NX PX`, or a TTL
refresh when the owner holds it already; release = compare-and-delete.

`claim` (the whole single-flight step, see `singleflight`) sends take for every key in one pipelined round
trip; when keys[0] turns out to be another owner's, a second round trip gives back what the call took or
the owner held (only when there is any).

A Redis fault (or the client's back-off) makes a lock count as held by nobody: `acquire` and `claim` answer
held (the engine computes the chunk itself, the safe fallback); `held_by_other` answers False. Faults are
counted in `errors` by kind, as the tier counts its own.
"""

from collections import Counter
from collections.abc import Sequence

from ..keys import ChunkKey
from ..singleflight import Grant
from .redis_client import RedisClient
from .redis_tier import RedisTier

LOCK_PREFIX = "lmc:lock:"

# KEYS[1] lock, ARGV[1] owner, ARGV[2] ttl ms -> 1 taken now, 2 the owner's already (expiry refreshed),
# 0 another owner's (left alone)
_TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 2 end
return 0
"""
# KEYS[1] lock, ARGV[1] owner -> 1 when the owner's lock was deleted, else 0
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lock_name(key: ChunkKey) -> str:
    return f"{LOCK_PREFIX}{{{key.name}}}"


class RedisLocks:
    def __init__(self, client: RedisClient | RedisTier):
        """client: the Redis to lock on; a RedisTier's own client is shared (connections, routing, back-off)."""
        if isinstance(client, RedisTier):
            client = client.client
        if not isinstance(client, RedisClient):
            raise TypeError(f"RedisLocks client: expected a RedisClient or RedisTier, got {type(client).__name__}")
        self.client = client
        self.errors: Counter = Counter()
        self._take_sha, self._release_sha = client.script(_TAKE), client.script(_RELEASE)

    def _run(self, items) -> list[list | None]:
        return self.client.run(items, self.errors, threads=False)  # small replies: no thread hand-offs

    def _take(self, keys: Sequence[ChunkKey], owner: str, ttl: float) -> list[int | None]:
        """Per key: 1 taken, 2 refreshed, 0 another owner's, None unknown (a fault)."""
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"RedisLocks ttl: expected seconds > 0, got {ttl!r}")
        ms = max(1, round(ttl * 1000))
        names = [lock_name(k) for k in keys]
        replies = self._run([(n, [("EVALSHA", self._take_sha, 1, n, owner, ms)]) for n in names])
        return [None if r is None else r[0] for r in replies]

    def claim(self, keys: Sequence[ChunkKey], owner: str, ttl: float) -> Grant:
        if not keys:
            return Grant(False, ())
        got = self._take(keys, owner, ttl)
        if got[0] == 0:
            self.release([k for k, g in zip(keys, got) if g in (1, 2)], owner)
            return Grant.refused(len(keys))
        return Grant(False, tuple(g != 0 for g in got))

    def acquire(self, keys: Sequence[ChunkKey], owner: str, ttl: float) -> list[bool]:
        return [g != 0 for g in self._take(keys, owner, ttl)]

    def release(self, keys: Sequence[ChunkKey], owner: str | None) -> None:
        if not keys:
            return
        names = [lock_name(k) for k in keys]
        if owner is None:
            self._run([(n, [("DEL", n)]) for n in names])
        else:
            self._run([(n, [("EVALSHA", self._release_sha, 1, n, owner)]) for n in names])

    def held_by_other(self, keys: Sequence[ChunkKey], owner: str) -> list[bool]:
        names = [lock_name(k) for k in keys]
        replies = self._run([(n, [("GET", n)]) for n in names])
        mine = owner.encode()
        return [r is not None and r[0] is not None and r[0] != mine for r in replies]
