"""Single-flight: when many requests miss the same chunk at once, one computes it and the others wait.

A lock per chunk key, held by an owner token for at most `ttl` seconds (a crashed owner cannot block
others for longer). `LocalLocks` covers one process; a distributed implementation (Redis, owner token,
compare-and-delete release, in `tiers/redis_locks.py`) covers instances sharing a Redis; `ChainedLocks`
asks the local layer first, then the distributed one. All answer without blocking; waiting is the caller's
loop (the vLLM scheduler must never block).

The single-flight step of one request is one call, `claim(missing, owner, ttl)`, where `missing` are the
chunk keys the tiers lack, in order:
- keys[0] is held by another owner: busy (ask again later); afterwards `owner` holds none of `keys` (what
  the call took in passing, or `owner` held before, is given back; in a chain, in the layers it asked);
- else: `owner` now holds every key that no other owner holds, each until now + ttl (taken, or refreshed when
  it held it already): compute them. `held` says which; held[0] is True.
With Redis this is one pipelined round trip (plus one to give keys back, only when busy while `owner`
holds some); `ChainedLocks` skips Redis altogether when another request of this process holds keys[0].
A Redis fault counts as "held by nobody": the keys are granted (the caller computes, the safe fallback).
"""

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .keys import ChunkKey


@dataclass(frozen=True)
class Grant:
    """What `claim` answered: busy (another owner holds keys[0]; `owner` holds none of the keys), or which
    of the keys `owner` holds now (`held[0]` is True)."""

    busy: bool
    held: tuple[bool, ...]

    @classmethod
    def refused(cls, n: int) -> "Grant":
        return cls(True, (False,) * n)


class Locks(Protocol):
    def claim(self, keys: Sequence[ChunkKey], owner: str, ttl: float) -> Grant:
        """The single-flight step (module docstring): busy, or `owner` takes every key nobody else holds."""

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

    def _take(self, keys, owner, ttl, now) -> list[bool]:
        """acquire's work, the lock held."""
        taken = []
        for key in keys:
            holder = self._holder(key, now)
            if holder is None or holder == owner:
                self._held[key] = (owner, now + ttl)
            taken.append(holder is None or holder == owner)
        return taken

    def claim(self, keys, owner, ttl):
        now = self._clock()
        with self._lock:
            if keys and self._holder(keys[0], now) not in (None, owner):
                self._release(keys, owner)
                return Grant.refused(len(keys))
            return Grant(False, tuple(self._take(keys, owner, ttl, now)))

    def acquire(self, keys, owner, ttl):
        now = self._clock()
        with self._lock:
            return self._take(keys, owner, ttl, now)

    def release(self, keys, owner):
        with self._lock:
            self._release(keys, owner)

    def _release(self, keys, owner):
        for key in keys:
            entry = self._held.get(key)
            if entry is not None and owner in (None, entry[0]):
                del self._held[key]

    def held_by_other(self, keys, owner):
        now = self._clock()
        with self._lock:
            return [self._holder(k, now) not in (None, owner) for k in keys]

    def held_count(self) -> int:
        """Locks held now (expired ones not counted)."""
        now = self._clock()
        with self._lock:
            return sum(1 for key in list(self._held) if self._holder(key, now) is not None)


class ChainedLocks:
    """Local locks first (cheap, exact within the process), then the distributed ones. A key is held only
    when every layer grants it; a key a layer refuses (every key, when a layer answers busy) is released from
    the layers before it, and the layers after it are not asked for it (a claim another request of this
    process makes busy never reaches Redis)."""

    def __init__(self, *layers: Locks):
        self.layers = layers

    def claim(self, keys, owner, ttl):
        held = [True] * len(keys)
        for depth, layer in enumerate(self.layers):
            want = [k for k, h in zip(keys, held) if h]
            grant = layer.claim(want, owner, ttl)
            if grant.busy:  # the layers before granted `want`: give it back
                self._release_from(self.layers[:depth], want, owner)
                return Grant.refused(len(keys))
            got = iter(grant.held)
            lost = [k for k, g in zip(want, grant.held) if not g]
            self._release_from(self.layers[:depth], lost, owner)
            held = [h and next(got) for h in held]
        return Grant(False, tuple(held))

    def acquire(self, keys, owner, ttl):
        taken = [True] * len(keys)
        for layer in self.layers:
            want = [k for k, t in zip(keys, taken) if t]
            got = iter(layer.acquire(want, owner, ttl))
            taken = [t and next(got) for t in taken]
        lost = [k for k, t in zip(keys, taken) if not t]
        if lost:  # partially taken: give back what an outer layer granted for keys an inner one refused
            self._release_from(self.layers, lost, owner)
        return taken

    @staticmethod
    def _release_from(layers, keys, owner) -> None:
        if keys:
            for layer in layers:
                layer.release(keys, owner)

    def release(self, keys, owner):
        self._release_from(self.layers, keys, owner)

    def held_by_other(self, keys, owner):
        held = [False] * len(keys)
        for layer in self.layers:
            held = [h or o for h, o in zip(held, layer.held_by_other(keys, owner))]
        return held
