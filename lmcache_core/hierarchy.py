"""The tier stack: find a chunk in the fastest tier holding it, promote on a lower-tier hit, demote or
write through on store, and prefetch lower-tier chunks upward in the background.

Tiers, fastest first: memory tiers (L1 device, L2 CPU arena) hold staging tensors; byte tiers (L3 disk,
L4 Redis) hold chunks serialized by `codec`. Any tier may be absent. Reads hand each chunk to a consumer
straight from the tier that holds it (`read_each`: a memory tier's entry under its lock, no copy), then
copy it into the memory tiers above; a prefetch decodes a byte-tier chunk straight into a memory tier's
entry. Write policies:
- write_through: a store goes into the top memory tier and L2, and (in a background thread) every byte tier;
- write_back: a store goes into the top memory tier only; an eviction hands the chunk one tier down.
A byte-tier chunk that fails verification is deleted there, counted, and treated as a miss.
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import codec
from .errors import CorruptChunkError
from .keys import ChunkKey
from .tiers.base import Tier
from .tiers.memory import Held, MemoryTier

log = logging.getLogger(__name__)

# Chunks per prefetch task: one byte-tier call per group, so a Redis Cluster's shards serve a group in
# parallel while another task decodes (2 tasks run at once). 31 chunks of SmolLM2 float32 KV (366 MB) into
# L2, 2 cores: from L3 255 ms one by one, 170 ms in fours, 149 ms in eights; from a 3-master cluster
# 525-684 / 491-515 / 478-501 ms. Four bounds the bytes in flight at 8 chunks.
PREFETCH_GROUP = 4


def _groups(keys: Sequence[ChunkKey]) -> list[Sequence[ChunkKey]]:
    return [keys[i:i + PREFETCH_GROUP] for i in range(0, len(keys), PREFETCH_GROUP)]


class TierStack:
    def __init__(self, memory: Sequence[MemoryTier], byte_tiers: Sequence[Tier], *, codec_name: str,
                 level: int, write_policy: str, secret: bytes | None, device: torch.device,
                 min_ratio: float = 1.0):
        self.memory = list(memory)
        self.byte_tiers = list(byte_tiers)
        self.codec = codec_name
        self.level = level
        self.min_ratio = min_ratio
        self.write_policy = write_policy
        self.secret = secret
        self.device = device
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-write")
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lmcache-prefetch")
        self._pending_writes: set[Future] = set()
        self._prefetching: dict[ChunkKey, Future] = {}
        self._lock = threading.Lock()
        # (shape, dtype) of every chunk of this cache, once the engine knows its KV spec: a byte-tier chunk
        # whose (checksummed, but possibly forged) header says otherwise is corrupt, never copied out.
        self.expect: tuple[tuple[int, ...], torch.dtype] | None = None
        # Pins (the engine's `pin`): key -> monotonic deadline, None until `unpin`. A pinned chunk is protected
        # in every memory tier that holds it, also in one it reaches later (promotion, prefetch, a new store).
        self._pins: dict[ChunkKey, float | None] = {}
        for tier in self.memory:
            tier.on_insert = lambda key, tier=tier: self._repin(tier, key)
        if write_policy == "write_back":
            for upper, lower in zip(self.memory, self.memory[1:]):
                upper.on_evict = lambda key, t, upper=upper, lower=lower: lower.put(
                    [(key, t)], positions=[upper.position(key)])
            if self.memory and self.byte_tiers:
                self.memory[-1].on_evict = self._demote_to_bytes

    @property
    def tiers(self) -> list[Tier]:
        return [*self.memory, *self.byte_tiers]

    # -- lookup -----------------------------------------------------------------------------------------

    def locate(self, keys: Sequence[ChunkKey]) -> list[int | None]:
        """Index (into `tiers`) of the fastest tier holding each key, or None; one batched call per tier."""
        where: list[int | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for t, tier in enumerate(self.tiers):
            if not todo:
                break
            present = tier.contains([keys[i] for i in todo])
            for i, hit in zip(todo, present):
                if hit:
                    where[i] = t
            todo = [i for i, hit in zip(todo, present) if not hit]
        return where

    def leading_run(self, keys: Sequence[ChunkKey]) -> list[int]:
        """Tier indices of the leading run of keys present somewhere (stops at the first absent key)."""
        run = []
        for t in self.locate(keys):
            if t is None:
                break
            run.append(t)
        return run

    # -- reads ------------------------------------------------------------------------------------------

    def read_into(self, keys: Sequence[ChunkKey], outs: Sequence[torch.Tensor]) -> int:
        """Fill `outs[i]` with chunk `keys[i]` in order; returns how many leading chunks were read."""
        return self.read_each(keys, lambda i, kv: outs[i].copy_(kv))

    def read_each(self, keys: Sequence[ChunkKey], consume: Callable[..., object], *,
                  with_position: bool = False) -> int:
        """Hand chunk `keys[i]` to `consume(i, kv)` in order; returns how many leading chunks were handed over.

        kv is valid only during the call (see `open_each`). with_position: consume(i, kv, position), the
        position the chunk's first token was computed at (None: not recorded)."""
        for i, key in enumerate(keys):
            held = self.open_one(key)
            if held is None:
                return i
            try:
                if with_position:
                    consume(i, held.tensor, held.position)
                else:
                    consume(i, held.tensor)
            finally:
                held.close()
        return len(keys)

    def open_each(self, keys: Sequence[ChunkKey]) -> list[Held]:
        """The leading run of `keys` as held chunks (stops at the first one no tier has): each from the
        fastest tier holding it, a memory tier's own entry (not reused until `close()`) or a chunk just
        decoded on the CPU. Read them, never modify them; close every one. Memory tiers hold chunks on their
        own device (L1: the engine's; L2: the CPU). Closing copies a chunk into the memory tiers above the
        one it came from (promotion)."""
        out = []
        for key in keys:
            held = self.open_one(key)
            if held is None:
                break
            out.append(held)
        return out

    def open_one(self, key: ChunkKey) -> Held | None:
        """One chunk from the fastest tier holding it (see `open_each`). Each tier is asked once, fastest
        first, so its hit and miss counters stay exact; a prefetch of it in flight lands first."""
        future = self._prefetching.get(key)
        if future is not None:
            future.result()
        for level, tier in enumerate(self.memory):
            held = tier.open(key)
            if held is not None:
                if level:
                    return Held(held.tensor, held.position,
                                lambda: (held.close(), self._promote_from(tier, key, above=level)))
                return held
        found = self._fetch_bytes(key, with_position=True)
        if found is None:
            return None
        kv, position = found
        return Held(kv, position, lambda: self._promote(key, kv, above=len(self.memory), position=position))

    def _fetch_bytes(self, key: ChunkKey, out: torch.Tensor | None = None, *, with_position: bool = False):
        """Read and decode `key` from the first byte tier that has a valid copy, or None. Decoded into `out`
        when given (and then returned), else into a new CPU tensor. with_position: (kv, position)."""
        for tier in self.byte_tiers:
            buf = tier.get([key])[0]
            found = None if buf is None else self._decode(tier, key, buf, out)
            if found is not None:
                return found if with_position else found[0]
        return None

    def _decode(self, tier: Tier, key: ChunkKey, buf, out: torch.Tensor | None = None):
        """codec.decode of key's bytes from `tier`: (kv, position), or None for a chunk that fails
        verification (deleted from `tier` and counted)."""
        try:
            kv, position = codec.decode(buf, key.raw, secret=self.secret, expect=self.expect, out=out)
            return kv, (None if position < 0 else position)  # the stored header says -1 for "not recorded"
        except CorruptChunkError as e:
            log.warning("%s: chunk %s failed verification (%s); deleted, counted as a miss", tier.name,
                        key.name, e)
            tier.stats.corrupt += 1
            tier.delete([key])
            return None

    def _promote(self, key: ChunkKey, kv: torch.Tensor, above: int, position: int | None = None) -> None:
        for tier in self.memory[:above]:
            tier.put([(key, kv)], positions=[position])

    def _promote_from(self, source: MemoryTier, key: ChunkKey, above: int) -> None:
        """Copy `key` from memory tier `source` into memory[:above], entry to entry (no lock is held while
        another is taken; the copies are not counted as hits of `source`)."""
        if not above:
            return
        positions: list[int | None] = []  # the position recorded with the very entry copied
        if self.expect is None:  # the chunk's shape is unknown here: take a copy first
            copies: list[torch.Tensor] = []
            if source.read_with(key, lambda t, pos: (copies.append(t.clone()), positions.append(pos)),
                                count=False, with_position=True):
                self._promote(key, copies[0], above, positions[0])
            return
        shape, dtype = self.expect

        def fill(dst: torch.Tensor) -> bool:
            return source.read_with(key, lambda t, pos: (dst.copy_(t), positions.append(pos)), count=False,
                                    with_position=True)

        for tier in self.memory[:above]:
            tier.put_with(key, shape, dtype, fill, position=lambda: positions[-1] if positions else None)

    def bring_into_memory(self, keys: Sequence[ChunkKey]) -> None:
        """Promote keys that only byte tiers hold into the memory tiers (synchronously)."""
        located = [key for key, t in zip(keys, self.locate(keys)) if t is not None and t >= len(self.memory)]
        for group in _groups(located):
            self._prefetch_group(group)

    # -- pins -------------------------------------------------------------------------------------------

    def pin(self, keys: Sequence[ChunkKey], ttl: float | None = None) -> list[bool]:
        """Protect each key in every memory tier holding it, until `unpin` (ttl None) or for `ttl` seconds;
        True where some memory tier protects it now (max_hot_ratio may refuse)."""
        deadline = None if ttl is None else time.monotonic() + ttl
        with self._lock:
            self._pins.update((key, deadline) for key in keys)
        held = [False] * len(keys)
        for tier in self.memory:
            held = [h or got for h, got in zip(held, tier.pin(keys, ttl))]
        return held

    def unpin(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in keys:
                self._pins.pop(key, None)
        for tier in self.memory:
            tier.unpin(keys)

    def _repin(self, tier: MemoryTier, key: ChunkKey) -> None:
        with self._lock:
            if key not in self._pins:
                return
            deadline = self._pins[key]
            if deadline is not None and deadline <= time.monotonic():
                del self._pins[key]
                return
        tier.pin([key], None if deadline is None else deadline - time.monotonic())

    def pinned_keys(self) -> int:
        """Chunks pinned now (expired pins not counted)."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for d in self._pins.values() if d is None or d > now)

    # -- prefetch ---------------------------------------------------------------------------------------

    def prefetch(self, keys: Sequence[ChunkKey], where: Sequence[int]) -> None:
        """Start moving chunks that live only in byte tiers up into memory, in the background, a few per
        task: one byte-tier call fetches a group (a cluster's shards serve it in parallel)."""
        if not self.memory:
            return
        started = []
        with self._lock:
            todo = [key for key, t in zip(keys, where) if t >= len(self.memory) and key not in self._prefetching]
            for group in _groups(todo):
                future = self._fetcher.submit(self._prefetch_group, group)
                self._prefetching.update((key, future) for key in group)
                started.append((future, group))
        for future, group in started:  # outside the lock: a finished future runs its callback right here
            future.add_done_callback(lambda _f, group=group: self._forget_prefetch(group))

    def _forget_prefetch(self, group: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in group:
                self._prefetching.pop(key, None)

    def _prefetch_group(self, keys: Sequence[ChunkKey]) -> None:
        """Fetch `keys`' bytes from the first byte tier holding each (one call per tier), then decode each
        straight into the lowest memory tier with room and copy it into the memory tiers above that one."""
        try:
            todo = list(keys)
            for tier in self.byte_tiers:
                if not todo:
                    break
                missing = []
                for key, buf in zip(todo, tier.get(todo)):
                    if buf is None:
                        missing.append(key)
                    else:
                        self._land(tier, key, buf)
                todo = missing
        except Exception:  # a prefetch is an optimization: log it, the read path fetches again
            log.exception("prefetch of chunks %s failed", [key.name for key in keys])

    def _land(self, tier: Tier, key: ChunkKey, buf) -> None:
        """Decode `buf` (key's bytes from `tier`) into the memory tiers. A corrupt chunk is deleted and
        counted, and left to the read path (which asks the next tier)."""
        if self.expect is None:  # the chunk's shape is unknown here: decode, then copy in
            found = self._decode(tier, key, buf)
            if found is not None:
                self._promote(key, found[0], above=len(self.memory), position=found[1])
            return
        shape, dtype = self.expect
        positions: list[int | None] = []

        def fill(dst: torch.Tensor) -> bool:
            found = self._decode(tier, key, buf, dst)
            positions.extend(found[1:] if found is not None else ())
            return found is not None

        for level in reversed(range(len(self.memory))):
            held = self.memory[level].put_with(key, shape, dtype, fill,
                                               position=lambda: positions[-1] if positions else None)
            if held is not None:  # None: no room in this tier, try the one above
                if held:
                    self._promote_from(self.memory[level], key, above=level)
                return

    # -- writes -----------------------------------------------------------------------------------------

    def store(self, items: Sequence[tuple[ChunkKey, torch.Tensor]], *, hot_ttl: float | None = None,
              on_written=None, positions: Sequence[int | None] | None = None) -> None:
        """Store chunks per the write policy; byte tiers are written in the background (see `flush`).
        `on_written()` runs once every tier that will get the chunks now has them. positions: where each
        chunk's first token was computed (kept with segment chunks; None: not recorded). The background
        writer encodes each chunk from the CPU memory tier's entry just written (held, so its memory is not
        reused meanwhile), never from the caller's tensor, which the caller may reuse as soon as this returns;
        a copy is made only when no CPU memory tier took the chunk.
        A memory tier that cannot take a chunk (full, allocation failure) is skipped for it: the other
        tiers still get it."""
        positions = list(positions) if positions is not None else [None] * len(items)
        targets = self.memory[:1] if self.write_policy == "write_back" else self.memory
        for tier in targets:
            try:
                tier.put(items, hot_ttl=hot_ttl, positions=positions)
            except (RuntimeError, MemoryError) as e:  # a tier that fails is skipped, never a lost store
                log.warning("%s: storing %d chunks failed (%s); skipped for them", tier.name, len(items), e)
        to_bytes = self.byte_tiers and items and (self.write_policy == "write_through" or not self.memory)
        if not to_bytes:
            if on_written is not None:
                on_written()
            return
        cpu_items = [(key, self._host_copy(key, kv)) for key, kv in items]
        future = self._writer.submit(self._write_bytes, cpu_items, on_written, positions)
        with self._lock:
            self._pending_writes.add(future)
        future.add_done_callback(self._write_done)

    def _write_done(self, future: Future) -> None:
        with self._lock:
            self._pending_writes.discard(future)
        if future.exception() is not None:
            log.error("background write failed: %r", future.exception())

    def _encode(self, key: ChunkKey, kv: torch.Tensor, position: int | None) -> bytes:
        return codec.encode(key.raw, kv, self.codec, level=self.level, min_ratio=self.min_ratio,
                            secret=self.secret, position=-1 if position is None else position)

    def _host_copy(self, key: ChunkKey, kv: torch.Tensor) -> Held:
        """The chunk's bytes on the CPU for the background writer: a CPU memory tier's entry, held, else a copy."""
        for tier in self.memory:
            if tier.device.type == "cpu":
                held = tier.open(key, count=False)
                if held is not None:
                    return held
        return Held(kv.detach().to("cpu", copy=True), None)

    def _write_bytes(self, items: Sequence[Held], on_written=None, positions=None) -> None:
        """Write each chunk to every byte tier that lacks it (encoding each chunk at most once), then let go
        of the held entries."""
        positions = positions if positions is not None else [None] * len(items)
        try:
            keys = [key for key, _ in items]
            missing = [tier.contains(keys) for tier in self.byte_tiers]
            blobs = {}
            for i, (key, held) in enumerate(items):
                if not all(present[i] for present in missing):
                    blobs[key] = self._encode(key, held.tensor, positions[i])
            for tier, present in zip(self.byte_tiers, missing):
                todo = [(key, blobs[key]) for key, hit in zip(keys, present) if not hit]
                if todo:
                    tier.put(todo)
        finally:
            for _, held in items:
                held.close()
            if on_written is not None:
                on_written()

    def _demote_to_bytes(self, key: ChunkKey, kv: torch.Tensor) -> None:
        blob = self._encode(key, kv, self.memory[-1].position(key))
        for tier in self.byte_tiers:
            if tier.put([(key, blob)])[0]:
                return

    def in_flight(self) -> int:
        """Background writes and prefetches started and not yet done."""
        with self._lock:
            return len(self._pending_writes) + len(set(self._prefetching.values()))

    def flush(self) -> None:
        """Wait for every background write and prefetch started so far."""
        with self._lock:
            pending = list(self._pending_writes) + list(self._prefetching.values())
        for future in pending:
            future.exception()

    # -- maintenance ------------------------------------------------------------------------------------

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        for tier in self.tiers:
            tier.delete(keys)

    def clear(self, memory_only: bool = False) -> None:
        self.flush()
        for tier in (self.memory if memory_only else self.tiers):
            tier.clear()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        self._fetcher.shutdown(wait=True)
        for tier in self.tiers:
            tier.close()
