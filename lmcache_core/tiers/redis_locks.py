"""Single-flight locks across engine instances that share a Redis (implements `singleflight.Locks`).

A lock is the key `lmc:lock:{<key.name>}` (the chunk's own hash tag: the lock lives on the chunk's slot)
holding the owner's token, with a millisecond expiry, so a crashed owner blocks others for at most `ttl`.
Each key is one small Lua script (one key, one slot: valid in a cluster, pipelined per node):
acquire = `SET NX PX`, or, when the caller already holds it, a TTL refresh; release = compare-and-delete.
A Redis fault (or the tier's back-off) makes a lock count as held by nobody: `acquire` answers True and the
engine computes the chunk itself, the safe fallback; `held_by_other` answers False. Faults are counted in
`errors` by kind, as the tier counts its own.
"""

from collections import Counter
from collections.abc import Sequence

from ..keys import ChunkKey
from .redis_tier import RedisTier

LOCK_PREFIX = "lmc:lock:"

# KEYS[1] lock, ARGV[1] owner, ARGV[2] ttl ms -> 1 when the owner holds the lock afterwards, else 0
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
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
    def __init__(self, tier: RedisTier):
        self.tier = tier  # shares its connections, routing and back-off
        self.errors: Counter = Counter()

    def acquire(self, keys: Sequence[ChunkKey], owner: str, ttl: float) -> list[bool]:
        if ttl <= 0:
            raise ValueError(f"RedisLocks.acquire ttl: expected seconds > 0, got {ttl!r}")
        ms = max(1, round(ttl * 1000))
        replies = self.tier.run([(lock_name(k), [("EVAL", _ACQUIRE, 1, lock_name(k), owner, ms)]) for k in keys],
                                self.errors)
        return [r is None or r[0] == 1 for r in replies]

    def release(self, keys: Sequence[ChunkKey], owner: str | None) -> None:
        if owner is None:
            self.tier.run([(lock_name(k), [("DEL", lock_name(k))]) for k in keys], self.errors)
        else:
            self.tier.run([(lock_name(k), [("EVAL", _RELEASE, 1, lock_name(k), owner)]) for k in keys], self.errors)

    def held_by_other(self, keys: Sequence[ChunkKey], owner: str) -> list[bool]:
        replies = self.tier.run([(lock_name(k), [("GET", lock_name(k))]) for k in keys], self.errors)
        mine = owner.encode()
        return [r is not None and r[0] is not None and r[0] != mine for r in replies]
