"""Eviction policy for the memory tiers: LRU order, with pinned and hot keys never chosen as victims.

A key is pinned from `pin` until `unpin` (a flag: pinning twice and unpinning once leaves it unpinned), and
hot until its hot deadline passes (it crossed `hot_hit_threshold` hits, or was stored or pinned with a TTL).
Pinned plus hot bytes are capped by the tier (`max_hot_ratio`), so protected data can never starve the cache.
"""

import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator


class LRUPolicy:
    def __init__(self, max_protected_bytes: int, hot_hit_threshold: int = 0, hot_ttl: float = 0.0,
                 clock=time.monotonic):
        self.max_protected_bytes = max_protected_bytes
        self._order: OrderedDict[Hashable, int] = OrderedDict()  # key -> bytes, least recent first
        self._hits: dict[Hashable, int] = {}
        self._pins: set[Hashable] = set()
        self._hot_until: dict[Hashable, float] = {}
        self._hot_hit_threshold = hot_hit_threshold
        self._hot_ttl = hot_ttl
        self._clock = clock

    def __contains__(self, key) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def add(self, key, nbytes: int) -> None:
        self._order[key] = nbytes
        self._order.move_to_end(key)

    def touch(self, key) -> None:
        """Record a hit: most recent now, and hot once it has been hit `hot_hit_threshold` times."""
        self._order.move_to_end(key)
        if self._hot_hit_threshold > 0 and self._hot_ttl > 0:
            hits = self._hits.get(key, 0) + 1
            self._hits[key] = hits
            if hits >= self._hot_hit_threshold and key not in self._hot_until:
                self.make_hot(key)

    def remove(self, key) -> None:
        self._order.pop(key, None)
        self._hits.pop(key, None)
        self._pins.discard(key)
        self._hot_until.pop(key, None)

    def _fits(self, key) -> bool:
        """Whether protecting `key` keeps protected bytes within the cap (already protected: yes)."""
        if self.is_protected(key):
            return True
        return self.protected_bytes() + self._order.get(key, 0) <= self.max_protected_bytes

    def pin(self, key) -> bool:
        """Pin `key` until `unpin`; False when the protected-bytes cap would be exceeded."""
        if key not in self._order or not self._fits(key):
            return False
        self._pins.add(key)
        return True

    def unpin(self, key) -> None:
        """No longer protected: neither pinned nor hot (it may become hot again by its hits)."""
        self._pins.discard(key)
        self._hot_until.pop(key, None)
        self._hits.pop(key, None)

    def make_hot(self, key, ttl: float | None = None) -> bool:
        """Protect `key` for `ttl` seconds (default hot_cache_ttl); False when over the protected cap."""
        if key not in self._order or not self._fits(key):
            return False
        self._hot_until[key] = self._clock() + (self._hot_ttl if ttl is None else ttl)
        return True

    def is_protected(self, key) -> bool:
        if key in self._pins:
            return True
        deadline = self._hot_until.get(key)
        if deadline is None:
            return False
        if deadline <= self._clock():
            del self._hot_until[key]  # hot status ends with hot_cache_ttl
            self._hits.pop(key, None)
            return False
        return True

    def sizes(self) -> dict[str, int]:
        """How much bookkeeping the policy holds: keys, hit counters, pins, hot deadlines (a leak check)."""
        return {"keys": len(self._order), "hit_counts": len(self._hits), "pins": len(self._pins),
                "hot": len(self._hot_until)}

    def protected_bytes(self) -> int:
        return sum(n for k, n in self._order.items() if self.is_protected(k))

    def victims(self) -> Iterator:
        """Unprotected keys, least recently used first."""
        for key in list(self._order):
            if not self.is_protected(key):
                yield key
