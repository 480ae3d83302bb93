"""The one small interface every tier implements, and the usage/counter record each one keeps.

Two kinds of tier share it: tensor tiers (L1 device, L2 CPU arena) hold staging tensors; byte tiers
(L3 disk, L4 Redis) hold serialized chunks (`lmcache_core.serde`). Keys are `ChunkKey`s. Calls are batched
(one round trip for many chunks where the medium allows). A tier never raises on an I/O fault: it answers
a miss (`None` / `False`), counts the fault in `stats.errors[kind]`, and the engine recomputes.
"""

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..keys import ChunkKey

V = TypeVar("V")


@dataclass
class TierStats:
    """Plain counters a tier updates; the metrics module reads them at scrape time."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    corrupt: int = 0  # chunks that failed verification (deleted)
    errors: Counter = field(default_factory=Counter)  # kind -> count (timeout, connection, disk_full, ...)


@dataclass(frozen=True)
class TierUsage:
    used_bytes: int
    capacity_bytes: int
    entries: int
    pinned_bytes: int = 0


class Tier(ABC, Generic[V]):
    """A place chunks live. V is `torch.Tensor` for tensor tiers and `bytes` for byte tiers."""

    name: str

    def __init__(self) -> None:
        self.stats = TierStats()

    @abstractmethod
    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each key is present (cheap: no payload moved, no recency update)."""

    @abstractmethod
    def get(self, keys: Sequence[ChunkKey]) -> list[V | None]:
        """Each key's value, or None for a miss (absent, expired, corrupt or unreachable)."""

    @abstractmethod
    def put(self, items: Sequence[tuple[ChunkKey, V]]) -> list[bool]:
        """Store each item whole, visible to readers only once complete; False when it was not stored."""

    @abstractmethod
    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove the keys if present."""

    @abstractmethod
    def usage(self) -> TierUsage: ...

    @abstractmethod
    def clear(self) -> None:
        """Remove every entry this tier holds."""

    def close(self) -> None:
        """Release files, connections and threads. Idempotent."""
