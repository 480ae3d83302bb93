"""Single-flight: when many requests miss the same chunk at once, one computes it and the others wait.

A lock per chunk key, held by an owner token for at most `ttl` seconds (a crashed owner cannot block
others for longer). `LocalLocks` covers one process; a distributed implementation (Redis `SET NX PX` with
an owner token and compare-and-delete release, in `tiers/redis_locks.py`) covers instances sharing a Redis.
Both answer without blocking; waiting is the caller's loop (the vLLM scheduler must never block).
"""

import threading
import time
from collections.abc import Sequence
from typing import Protocol

from .keys import ChunkKey


class Locks(Protocol):
    def acquire(self, keys: Sequence[ChunkKey], owner: str, ttl: float) -> list[bool]:
        """Take each key's lock for `owner` unless another owner holds it; True where `owner` holds it now."""

    def release(self, keys: Sequence[ChunkKey], owner: str | None) -> None:
        """Release the keys `owner` holds (never another owner's); owner None: whoever holds them (the
        chunks were just stored, so nobody needs to compute them any more)."""

    def held_by_other(self, keys: Sequence[ChunkKey], owner: str) -> list[bool]: ...


class LocalLocks:
    def __init__(self, clock=time.monotonic):
        self._held: dict[ChunkKey, tuple[str, float]] = {}  # key -> (owner, deadline)
        self._lock = threading.Lock()
        self._clock = clock

    def _holder(self, key: ChunkKey, now: float) -> str | None:
        entry = self._held.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self._held[key]
            return None
        return entry[0]

    def acquire(self, keys, owner, ttl):
        now = self._clock()
        taken = []
        with self._lock:
            for key in keys:
                holder = self._holder(key, now)
                if holder is None or holder == owner:
                    self._held[key] = (owner, now + ttl)
                taken.append(holder is None or holder == owner)
        return taken

    def release(self, keys, owner):
        with self._lock:
            for key in keys:
                entry = self._held.get(key)
                if entry is not None and owner in (None, entry[0]):
                    del self._held[key]

    def held_by_other(self, keys, owner):
        now = self._clock()
        with self._lock:
            return [self._holder(k, now) not in (None, owner) for k in keys]


class ChainedLocks:
    """Local locks first (cheap, exact within the process), then the distributed ones."""

    def __init__(self, *layers: Locks):
        self.layers = layers

    def acquire(self, keys, owner, ttl):
        taken = [True] * len(keys)
        for layer in self.layers:
            want = [k for k, t in zip(keys, taken) if t]
            got = iter(layer.acquire(want, owner, ttl))
            taken = [t and next(got) for t in taken]
        lost = [k for k, t in zip(keys, taken) if not t]
        if lost:  # partially taken: give back what an outer layer granted for keys an inner one refused
            for layer in self.layers:
                layer.release(lost, owner)
        return taken

    def release(self, keys, owner):
        for layer in self.layers:
            layer.release(keys, owner)

    def held_by_other(self, keys, owner):
        held = [False] * len(keys)
        for layer in self.layers:
            held = [h or o for h, o in zip(held, layer.held_by_other(keys, owner))]
        return held
