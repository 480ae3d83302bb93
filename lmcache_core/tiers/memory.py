"""Memory tiers: L1 (tensors on the serving device) and L2 (one pinned CPU arena, sub-allocated).

Both keep staging tensors `[L, KV, N, H, D]` under an LRU with pinned/hot protection and a byte cap.
A put is two-phase: space is reserved and filled first (`put` copies a tensor in, `put_with` lets the
caller write the entry, e.g. decode straight into it), and the key becomes visible only when the fill is
complete, so a concurrent reader never sees half a chunk. `read_with` hands a reader the entry itself (no
copy), e.g. to scatter it into a paged cache, outside the tier's lock: an entry removed meanwhile keeps its
memory until its last reader is done, so other threads store and promote while one reads. When room is
needed, least recently used unprotected entries are evicted; the `on_evict` callback (set by the engine)
sees each victim first, so it can demote it to a lower tier (write-back).
"""

import logging
import threading
from collections.abc import Callable, Sequence

import torch

from ..eviction import LRUPolicy
from ..keys import ChunkKey
from .base import Tier, TierUsage

log = logging.getLogger(__name__)


class ArenaAllocator:
    """One buffer cut into equal slots: no fragmentation and no allocation on the hot path.

    Chunks of one model all have one size. With `slot_bytes` (the engine knows its chunk size) the whole
    arena is allocated here, at start-up, and `commit` touches every page so the memory is really taken
    now (a host tier must never leave the kernel to find the memory later). Without it the arena is
    allocated on the first entry, sized by that entry. A larger entry, or one that finds no free slot, is
    refused (`alloc` returns None): the caller skips this tier for that chunk.

    device: the CPU (L2, or L1 of a CPU engine) or a GPU (L1: one device allocation for the whole tier).
    pin: page-lock a CPU arena for fast, asynchronous copies to and from the GPU. It is registered with
    `cudaHostRegister` rather than allocated by torch's pinned allocator, which rounds every request up
    to a power of two (5 GB would take 8 GiB).
    """

    def __init__(self, capacity: int, pin: bool = False, *, device: torch.device | str = "cpu",
                 slot_bytes: int | None = None, commit: bool = False):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self._pin = pin and self.device.type == "cpu"
        self._commit = commit
        self._arena: torch.Tensor | None = None
        self._registered = False
        self._slot_bytes = 0
        self._free: list[int] = []
        self._slot_of: dict[int, int] = {}  # data_ptr -> slot
        if slot_bytes is not None and 0 < slot_bytes <= self.capacity:
            self._init(slot_bytes)

    @property
    def slots(self) -> int:
        return self.capacity // self._slot_bytes if self._slot_bytes else 0

    def _init(self, nbytes: int) -> None:
        slots = self.capacity // nbytes
        make = torch.zeros if self._commit else torch.empty
        self._arena = make(slots * nbytes, dtype=torch.uint8, device=self.device)
        if self._pin:
            self._register()
        self._slot_bytes = nbytes
        self._free = list(range(slots - 1, -1, -1))

    def _register(self) -> None:
        """Page-lock the arena in place (CUDA only); a failure leaves it pageable, with a warning."""
        err = torch.cuda.cudart().cudaHostRegister(self._arena.data_ptr(), self._arena.numel(), 0)
        self._registered = int(err) == 0
        if not self._registered:
            log.warning("cudaHostRegister of a %d-byte arena failed (error %s): host<->device copies from it "
                        "are synchronous", self._arena.numel(), err)

    def alloc(self, shape, dtype) -> torch.Tensor | None:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if self._arena is None:
            if nbytes > self.capacity or nbytes == 0:
                return None
            self._init(nbytes)
        if nbytes > self._slot_bytes or not self._free:
            return None
        slot = self._free.pop()
        t = self._arena[slot * self._slot_bytes: slot * self._slot_bytes + nbytes].view(dtype).view(shape)
        self._slot_of[t.data_ptr()] = slot
        return t

    def free(self, t: torch.Tensor) -> None:
        self._free.append(self._slot_of.pop(t.data_ptr()))

    def entry_bytes(self, nbytes: int) -> int:
        """Bytes an entry of `nbytes` occupies (a whole slot)."""
        return max(nbytes, self._slot_bytes)

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())
            self._registered = False
        self._arena = None
        self._free, self._slot_of = [], {}


def device_allocator(device: torch.device, capacity: int, slot_bytes: int | None = None) -> ArenaAllocator:
    """L1's allocator: one arena on the device, allocated once (no per-entry device allocation after
    vLLM has sized its KV cache; on the CPU, torch's allocator would also hand every multi-megabyte entry
    fresh pages: promoting an 11.8 MB chunk into fresh pages took 16 ms in bench.ttft ours-L3 on 2 cores)."""
    return ArenaAllocator(capacity, device=device, slot_bytes=slot_bytes, commit=device.type == "cpu")


class Held:
    """A chunk being read: the tensor (a tier's own entry, or a chunk decoded for this read), the position
    recorded with it (None: not recorded), and `close()`, which lets its tier reuse the memory."""

    __slots__ = ("tensor", "position", "_release")

    def __init__(self, tensor: torch.Tensor, position: int | None, release: Callable[[], None] | None = None):
        self.tensor, self.position, self._release = tensor, position, release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class MemoryTier(Tier[torch.Tensor]):
    def __init__(self, name: str, capacity: int, allocator, *, max_protected_bytes: int,
                 hot_hit_threshold: int = 0, hot_ttl: float = 0.0):
        super().__init__()
        self.name = name
        self.capacity = capacity
        self.device = getattr(allocator, "device", torch.device("cpu"))
        self._alloc = allocator
        self._entries: dict[ChunkKey, torch.Tensor] = {}
        self._positions: dict[ChunkKey, int] = {}  # where an entry's first token was computed, when recorded
        self._policy = LRUPolicy(max_protected_bytes, hot_hit_threshold, hot_ttl)
        self._used = 0
        self._readers: dict[int, int] = {}  # entry data_ptr -> readers in read_with right now
        self._retired: dict[int, torch.Tensor] = {}  # entries removed while read, freed by their last reader
        self._lock = threading.RLock()
        self.on_evict: Callable[[ChunkKey, torch.Tensor], None] | None = None
        self.on_insert: Callable[[ChunkKey], None] | None = None  # a key just became visible (the engine's pins)

    # -- reads ------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def get(self, keys: Sequence[ChunkKey]) -> list[torch.Tensor | None]:
        """Copies of the stored tensors (an entry's memory may be reused once it is evicted)."""
        out = []
        with self._lock:
            for k in keys:
                t = self._hit(k)
                out.append(None if t is None else t.clone())
        return out

    def open(self, key: ChunkKey, *, count: bool = True) -> "Held | None":
        """The stored entry itself, held: until `Held.close()` its memory is not reused, even if the entry
        is evicted or deleted meanwhile (so a reader may copy out of it asynchronously and close once the
        copy is done). Read it only, never keep it past close. None for a miss. count=False: an internal
        copy (promotion), kept out of the hit/miss counters and recency."""
        with self._lock:
            t = self._hit(key) if count else self._entries.get(key)
            if t is None:
                return None
            ptr = t.data_ptr()
            self._readers[ptr] = self._readers.get(ptr, 0) + 1
            return Held(t, self._positions.get(key), lambda: self._release(ptr))

    def _release(self, ptr: int) -> None:
        with self._lock:
            left = self._readers.pop(ptr) - 1
            if left:
                self._readers[ptr] = left
            elif ptr in self._retired:  # removed while held: its memory is free now
                self._alloc.free(self._retired.pop(ptr))

    def read_with(self, key: ChunkKey, fn: Callable[..., object], *, count: bool = True,
                  with_position: bool = False) -> bool:
        """Call fn(entry) with the stored tensor itself (no copy: fn must only read it, and must not keep it);
        False for a miss. fn runs outside the lock (see `open`). with_position: fn(entry, position), the
        position recorded with this very entry (or None)."""
        held = self.open(key, count=count)
        if held is None:
            return False
        try:
            if with_position:
                fn(held.tensor, held.position)
            else:
                fn(held.tensor)
        finally:
            held.close()
        return True

    def position(self, key: ChunkKey) -> int | None:
        """The position the entry's first token was computed at (segment chunks); None: not recorded."""
        with self._lock:
            return self._positions.get(key)

    def read_into(self, items: Sequence[tuple[ChunkKey, torch.Tensor]]) -> list[bool]:
        """Copy each key's tensor into its destination (any device) under the lock; False for a miss."""
        found = []
        with self._lock:
            for k, dst in items:
                t = self._hit(k)
                if t is not None:
                    dst.copy_(t, non_blocking=False)
                found.append(t is not None)
        return found

    def _hit(self, k: ChunkKey) -> torch.Tensor | None:
        t = self._entries.get(k)
        if t is None:
            self.stats.misses += 1
            return None
        self._policy.touch(k)
        self.stats.hits += 1
        self.stats.bytes_read += t.nbytes
        return t

    # -- writes -----------------------------------------------------------------------------------------

    def _nbytes(self, t: torch.Tensor) -> int:
        return self._entry_bytes(t.nbytes)

    def _entry_bytes(self, nbytes: int) -> int:
        sized = getattr(self._alloc, "entry_bytes", None)
        return sized(nbytes) if sized else nbytes

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.capacity:
            return False
        for victim in self._policy.victims():
            if self._used + nbytes <= self.capacity:
                break
            self._evict(victim)
        return self._used + nbytes <= self.capacity

    def _evict(self, key: ChunkKey) -> None:
        t = self._entries[key]
        if self.on_evict is not None:
            self.on_evict(key, t)
        self._remove(key)
        self.stats.evictions += 1

    def _remove(self, key: ChunkKey) -> None:
        t = self._entries.pop(key)
        self._positions.pop(key, None)
        self._policy.remove(key)
        self._used -= self._nbytes(t)
        if t.data_ptr() in self._readers:
            self._retired[t.data_ptr()] = t
        else:
            self._alloc.free(t)

    def put(self, items: Sequence[tuple[ChunkKey, torch.Tensor]], *, hot_ttl: float | None = None,
            positions: Sequence[int | None] | None = None) -> list[bool]:
        """Copy each tensor in; with `hot_ttl`, the new entries are hot for that long (pin=True stores);
        `positions`: where each chunk's first token was computed (segment chunks), None: not recorded."""
        positions = positions if positions is not None else [None] * len(items)
        return [bool(self.put_with(key, src.shape, src.dtype, lambda dst, src=src: dst.copy_(src) is not None,
                                   hot_ttl=hot_ttl, position=pos)) for (key, src), pos in zip(items, positions)]

    def put_with(self, key: ChunkKey, shape, dtype: torch.dtype, fill: Callable[[torch.Tensor], bool], *,
                 hot_ttl: float | None = None,
                 position: int | None | Callable[[], int | None] = None) -> bool | None:
        """Store an entry of `shape` and `dtype` whose bytes `fill(dst)` writes, outside the lock; the key
        becomes visible once fill returned True. Returns True when the key is held now (already held: fill
        is not called), False when fill returned False (nothing stored), None when there is no room (fill
        is not called). position: the entry's (see `position`), or a function giving it once fill ran."""
        with self._lock:
            if key in self._entries:
                self._policy.touch(key)
                return True
            nbytes = self._entry_bytes(torch.Size(shape).numel() * dtype.itemsize)
            dst = self._alloc.alloc(shape, dtype) if self._make_room(nbytes) else None
            if dst is None:
                return None
            self._used += self._nbytes(dst)  # reserved: counted, not yet visible
        filled = inserted = False
        try:
            filled = fill(dst)  # outside the lock; the key is not visible yet
        finally:
            with self._lock:
                if not filled or key in self._entries:  # fill failed, or a concurrent put of the chunk won
                    self._used -= self._nbytes(dst)
                    self._alloc.free(dst)
                else:
                    self._entries[key] = dst
                    pos = position() if callable(position) else position
                    if pos is not None:
                        self._positions[key] = pos
                    self._policy.add(key, self._nbytes(dst))
                    if hot_ttl is not None:
                        self._policy.make_hot(key, hot_ttl)
                    self.stats.bytes_written += dst.nbytes
                    inserted = True
        if inserted and self.on_insert is not None:  # outside the lock (it may take other locks)
            self.on_insert(key)
        return bool(filled)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for k in keys:
                if k in self._entries:
                    self._remove(k)

    def pin(self, keys: Sequence[ChunkKey], ttl: float | None = None) -> list[bool]:
        """Protect each key from eviction: until `unpin` (ttl None) or for `ttl` seconds (hot); False where the
        key is absent or max_hot_ratio would be exceeded."""
        with self._lock:
            return [self._policy.pin(k) if ttl is None else self._policy.make_hot(k, ttl) for k in keys]

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for k in keys:
                self._policy.unpin(k)

    def sizes(self) -> dict[str, int]:
        """How much bookkeeping the tier holds (entries, recorded positions, entries being read, entries removed
        while read, and its eviction policy's): bounded by the capacity, never by the keys seen."""
        with self._lock:
            return {"entries": len(self._entries), "positions": len(self._positions), "readers": len(self._readers),
                    "retired": len(self._retired), **{f"policy_{k}": v for k, v in self._policy.sizes().items()}}

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.capacity, len(self._entries), self._policy.protected_bytes())

    def clear(self) -> None:
        with self._lock:
            for k in list(self._entries):
                self._remove(k)

    def close(self) -> None:
        self.clear()
        with self._lock:
            if not self._readers:  # a reader still holds an entry: the arena goes with the last reference
                self._alloc.close()
