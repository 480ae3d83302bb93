"""CacheEngine: the public face of the tiered KV cache. Engine-agnostic: token ids in, staging KV out.

Tokens are cut into chunks of `chunk_size`; only full chunks are stored. A chunk's key is its hash
(`kernels.chunk_hashes`: prefix mode chains over everything before it, segment mode covers its own tokens)
salted with `cache_salt` and the call's namespace (`keys.chunk_salt`), plus the KV spec's fingerprint.
`lookup` answers how many leading tokens are available in any tier; `retrieve` copies them out of the
fastest tier holding each chunk; `retrieve_chunks` hands each chunk to a callback without copying it first.

The single-request calls (lookup, retrieve, retrieve_chunks, store, claim, release, pin, unpin) also take
`keys=`: the chunk keys `keys()` returned for the same tokens, mode and namespace, so a caller asking
several times about one request hashes its prompt once; `store` and `retrieve_chunks` take `keys=` alone
(token_ids None) when the caller only has the keys of the chunks it moves (a connector's worker).

Memory tiers are sized once, at construction (`budget.plan_memory`: what the configuration asks for, capped
by what the machine has left), and allocated there when the KV spec is known, so their memory is taken at
start-up, never in the middle of serving.
"""

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from kernels import chunk_hashes

from . import metrics
from .budget import MemoryPlan, plan_memory
from .config import CacheConfig
from .errors import LockTimeoutError
from .hierarchy import TierStack
from .keys import ChunkKey, KVSpec, chunk_salt
from .singleflight import ChainedLocks, LocalLocks
from .tiers import build_byte_tiers
from .tiers import distributed_locks as redis_locks
from .tiers.memory import ArenaAllocator, Held, MemoryTier, device_allocator

log = logging.getLogger(__name__)

_POLL_S = 0.005  # wait loop for another owner's chunk: 5 ms, well under one prefill step


class ClaimState(str, Enum):
    HIT = "hit"  # every full chunk is cached
    COMPUTE = "compute"  # the caller holds the locks of the missing chunks: compute them, then store or release
    BUSY = "busy"  # another owner computes the first missing chunk: ask again later


@dataclass(frozen=True)
class Claim:
    """The single-flight answer for one token sequence; hit_tokens: leading tokens available now."""

    state: ClaimState
    hit_tokens: int


@dataclass(frozen=True)
class Probe:
    """One ask about a request's chunks (`ask`): the name of the fastest tier holding each chunk of the
    leading run, and the single-flight answer when an owner was given (else None)."""

    tiers: tuple[str, ...]
    claim: ClaimState | None = None


class CacheEngine:
    def __init__(self, config: CacheConfig | None = None, *, spec: KVSpec | None = None,
                 device: torch.device | str | None = None, lock_timeout: float | None = None,
                 fallback_on_timeout: bool | None = None, byte_tiers=None, distributed_locks=None,
                 memory: MemoryPlan | None = None):
        """byte_tiers: L3/L4 tiers to use instead of the ones the config describes (None: from config).
        memory: the sizes of L1 and L2 (None: `plan_memory` for one worker, from the machine's figures now)."""
        self.config = config if config is not None else CacheConfig.load()
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.spec = spec
        self.lock_timeout = self.config.lock_timeout if lock_timeout is None else lock_timeout
        self.fallback_on_timeout = (self.config.fallback_on_timeout if fallback_on_timeout is None
                                    else fallback_on_timeout)
        self.owner = uuid.uuid4().hex  # this engine's single-flight owner token
        cfg = self.config
        if byte_tiers is None:
            byte_tiers = build_byte_tiers(cfg)
            distributed_locks = distributed_locks or redis_locks(byte_tiers)
        self._local_locks, self._remote_locks = LocalLocks(), distributed_locks
        self.locks = ChainedLocks(*(x for x in (self._local_locks, distributed_locks) if x is not None))
        self.memory_plan = memory if memory is not None else plan_memory(cfg, self.device)
        for note in self.memory_plan.notes:
            log.warning("lmcache: %s", note)
        secret = cfg.cache_secret.encode() if cfg.cache_secret else None
        self.tiers = TierStack(self._memory_tiers(self.memory_plan), list(byte_tiers),
                               codec_name=cfg.effective_codec, level=cfg.compression_level,
                               min_ratio=cfg.compression_min_ratio, write_policy=cfg.write_policy, secret=secret,
                               device=self.device)
        self.tiers.expect = self._chunk_layout()
        metrics.register(self, cfg.metrics_port)

    # -- construction -----------------------------------------------------------------------------------

    def _chunk_bytes(self) -> int | None:
        if self.spec is None:
            return None
        dtype = getattr(torch, self.spec.dtype, None)
        return torch.Size(self.spec.chunk_shape()).numel() * dtype.itemsize if isinstance(dtype, torch.dtype) else None

    def _memory_tiers(self, plan: MemoryPlan) -> list[MemoryTier]:
        cfg, slot = self.config, self._chunk_bytes()
        protect = dict(hot_hit_threshold=cfg.hot_hit_threshold, hot_ttl=cfg.hot_cache_ttl)
        tiers = []
        for name, nbytes in (("L1", plan.l1_bytes), ("L2", plan.l2_bytes)):
            if nbytes <= 0 or (slot is not None and nbytes < slot):
                continue
            try:
                alloc = (device_allocator(self.device, nbytes, slot) if name == "L1" else
                         ArenaAllocator(nbytes, pin=torch.cuda.is_available(), slot_bytes=slot, commit=True))
            except (RuntimeError, MemoryError) as e:  # an allocation failure is a tier skipped, never a crash
                log.warning("lmcache: %s: allocating %d bytes failed (%s); running without %s", name, nbytes, e, name)
                continue
            tiers.append(MemoryTier(name, nbytes, alloc, max_protected_bytes=int(cfg.max_hot_ratio * nbytes),
                                    **protect))
        return tiers

    # -- keys -------------------------------------------------------------------------------------------

    def _spec_from(self, kv: torch.Tensor) -> KVSpec:
        """A spec from the first stored tensor, when none was given: the model is unnamed, so two models
        of one geometry and dtype would share entries; pass spec= to CacheEngine to rule that out."""
        log.warning("CacheEngine without spec=: keys use the KV geometry %s %s only (no model name)",
                    tuple(kv.shape), kv.dtype)
        mla = kv.dim() == 4
        return KVSpec("unnamed", str(kv.dtype).removeprefix("torch."), "staging", kv.shape[0], kv.shape[1],
                      1 if mla else kv.shape[3], kv.shape[-1], self.config.chunk_size)

    def _chunk_layout(self) -> tuple[tuple[int, ...], torch.dtype] | None:
        """(shape, dtype) of every chunk this engine stores: byte tiers reject chunks that say otherwise."""
        dtype = getattr(torch, self.spec.dtype, None) if self.spec is not None else None
        return (self.spec.chunk_shape(), dtype) if isinstance(dtype, torch.dtype) else None

    def keys(self, token_ids, *, mode: str = "prefix", namespace: str | None = None) -> list[ChunkKey]:
        """Keys of the full chunks of `token_ids` (empty until the KV spec is known: given at construction,
        or taken from the first store)."""
        if self.spec is None:
            return []
        hashes = chunk_hashes(token_ids, chunk_size=self.config.chunk_size, mode=mode, salt=self.salt(namespace))
        return self.keys_of(hashes)

    def salt(self, namespace: str | None = None) -> bytes:
        """What `keys` mixes into every chunk hash: `cache_salt` and the namespace."""
        return chunk_salt(self.config.cache_salt, namespace)

    def keys_of(self, chunk_hashes_: Sequence[bytes]) -> list[ChunkKey]:
        """Keys of chunk hashes computed elsewhere (with `salt()`), e.g. by a scheduler in another process."""
        return [ChunkKey(self.spec.fingerprint, h) for h in chunk_hashes_] if self.spec is not None else []

    def _keys(self, token_ids, mode: str, namespace: str | None, keys: Sequence[ChunkKey] | None) -> list[ChunkKey]:
        """`keys` when the caller passed them (checked for length against token_ids when given), else
        `keys()` of the tokens."""
        if keys is None or self.spec is None:
            if token_ids is None:
                raise TypeError("token_ids: expected token ids, or keys= with token_ids None")
            return self.keys(token_ids, mode=mode, namespace=namespace)
        if token_ids is not None and len(keys) != len(token_ids) // self.config.chunk_size:
            raise ValueError(f"keys: expected {len(token_ids) // self.config.chunk_size} chunk keys for "
                             f"{len(token_ids)} tokens (chunk_size={self.config.chunk_size}), got {len(keys)}; "
                             "pass keys(token_ids) of the same tokens, mode and namespace")
        return list(keys)

    def _check_kv(self, kv: torch.Tensor) -> None:
        if not isinstance(kv, torch.Tensor) or kv.dim() not in (4, 5):
            raise TypeError(f"kv: expected a staging tensor [L, KV, N, H, D] ([L, 1, N, D] for MLA), got "
                            f"{type(kv).__name__} {tuple(getattr(kv, 'shape', ()))}")
        if self.spec is None:
            self.spec = self._spec_from(kv)
            self.tiers.expect = self._chunk_layout()
        expected = self.spec.chunk_shape(kv.shape[2])
        if tuple(kv.shape) != expected or str(kv.dtype).removeprefix("torch.") != self.spec.dtype:
            raise ValueError(f"kv: expected shape {expected} and dtype {self.spec.dtype} (the engine's "
                             f"KVSpec), got {tuple(kv.shape)} {kv.dtype}")

    # -- the API ----------------------------------------------------------------------------------------

    def lookup(self, token_ids, *, mode: str = "prefix", namespace: str | None = None,
               keys: Sequence[ChunkKey] | None = None) -> int:
        """Leading tokens (whole chunks) available in any tier; starts prefetching lower-tier chunks."""
        keys = self._keys(token_ids, mode, namespace, keys)
        probe = self.ask(keys, prefetch=self.config.prefetch_enabled)
        return len(probe.tiers) * self.config.chunk_size

    def ask(self, keys: Sequence[ChunkKey], *, owner: str | None = None, prefetch: bool = False) -> Probe:
        """Where the leading run of `keys` lives (each tier asked once, in one batched call), and with an
        `owner`, the single-flight step for the chunks after it (see `claim`). prefetch: start moving the
        run's lower-tier chunks up into memory. Counted as one lookup in the metrics."""
        with metrics.LATENCY.labels("lookup").time():
            run = self.tiers.leading_run(keys)
            if run and prefetch:
                self.tiers.prefetch(keys[: len(run)], run)
            state = self._claim_missing(keys[len(run):], owner) if owner is not None else None
        cs = self.config.chunk_size
        metrics.LOOKUPS.inc()
        metrics.LOOKUP_TOKENS.inc(len(keys) * cs)
        metrics.HIT_TOKENS.inc(len(run) * cs)
        names = [tier.name for tier in self.tiers.tiers]
        return Probe(tuple(names[t] for t in run), state)

    def _start_chunk(self, start: int) -> int:
        cs = self.config.chunk_size
        if not isinstance(start, int) or start < 0 or start % cs:
            raise ValueError(f"start: expected a token position that is a multiple of chunk_size={cs}, got {start!r}")
        return start // cs

    def store(self, token_ids, kv: torch.Tensor, *, start: int = 0, pin: bool = False, mode: str = "prefix",
              namespace: str | None = None, keys: Sequence[ChunkKey] | None = None) -> int:
        """Store full chunks of `token_ids` from staging `kv` [L, KV, N, H, D]; returns tokens stored.

        kv holds the tokens from `start` (a multiple of chunk_size; chunks before it are not touched) to
        start + N; the chunks that lie wholly inside are stored. token_ids None: `keys` are the keys of
        exactly the chunks kv holds (start must be 0). pin=True keeps the new entries in memory for
        `hot_cache_ttl` (hot); `pin()` pins until `unpin()`. kv may be reused as soon as this returns.
        """
        self._check_kv(kv)
        first = self._start_chunk(start)
        cs = self.config.chunk_size
        if token_ids is None and first:
            raise ValueError("start: must be 0 when token_ids is None (keys are those of the chunks kv holds)")
        keys = self._keys(token_ids, mode, namespace, keys)[first: first + kv.shape[2] // cs]
        if not keys:
            return 0
        with metrics.LATENCY.labels("store").time():
            # Every chunk goes down: a tier that already holds one skips it (memory tiers refresh its
            # recency; byte tiers are asked before anything is encoded), so a tier that lost it, like a
            # restarted Redis, gets it back.
            items = [(key, kv[:, :, i * cs:(i + 1) * cs]) for i, key in enumerate(keys)]
            # Stored: whoever claimed these chunks need not compute them. Waiters here are released once the
            # memory tiers hold the chunks, other instances once the shared tiers do, so a waiter finds them
            # instead of recomputing (released earlier, it could claim them in between and compute them).
            remote = self._remote_locks
            try:
                self.tiers.store(items, hot_ttl=self.config.hot_cache_ttl if pin else None,
                                 on_written=(lambda: remote.release(keys, None)) if remote else None)
            finally:
                self._local_locks.release(keys, None)
        metrics.STORED_TOKENS.inc(len(items) * cs)
        return len(keys) * cs

    def retrieve(self, token_ids, *, start: int = 0, mode: str = "prefix", namespace: str | None = None,
                 out: torch.Tensor | None = None, keys: Sequence[ChunkKey] | None = None
                 ) -> tuple[int, torch.Tensor | None]:
        """(n, kv): KV `[L, KV, n, H, D]` of the n tokens available from `start` (a multiple of chunk_size;
        0: the prompt's leading tokens) in a run of whole chunks, on the engine's device; (0, None) for none.
        out: a staging buffer to fill (at least n tokens long)."""
        with metrics.LATENCY.labels("retrieve").time():
            keys = self._keys(token_ids, mode, namespace, keys)[self._start_chunk(start):]
            run = self.tiers.leading_run(keys)
            if not run:
                return 0, None
            cs = self.config.chunk_size
            n = len(run) * cs
            if out is None:
                out = torch.empty(self.spec.chunk_shape(n), dtype=getattr(torch, self.spec.dtype),
                                  device=self.device)
            got = self.tiers.read_into(keys[: len(run)], [out[:, :, i * cs:(i + 1) * cs] for i in range(len(run))])
        if got < len(run):  # evicted or corrupt between lookup and read: the leading part is still good
            out = out[:, :, : got * cs]
        metrics.RETRIEVED_TOKENS.inc(got * cs)
        return (got * cs, out) if got else (0, None)

    def retrieve_chunks(self, token_ids, consume: Callable[[int, torch.Tensor], object], *, start: int = 0,
                        mode: str = "prefix", namespace: str | None = None,
                        keys: Sequence[ChunkKey] | None = None) -> int:
        """`retrieve` without a buffer: hands chunk i (from `start`, in order) to `consume(i, kv)` straight
        from the tier holding it, and returns the tokens handed over (a leading run of whole chunks).
        token_ids None: `keys` are the chunks to hand over (start must be 0).

        kv: the chunk's staging tensor `[L, KV, chunk_size, H, D]`, on the device of the tier that holds it
        (L1: the engine's device; L2 and decoded L3/L4 chunks: the CPU). It is valid only during the call and
        may be a cache entry read under its tier's lock: read it (e.g. scatter it into a paged cache), never
        modify or keep it, and call nothing of this engine from consume. An exception in consume propagates;
        the chunks before it were handed over."""
        with metrics.LATENCY.labels("retrieve").time():
            keys = self._keys(token_ids, mode, namespace, keys)[self._start_chunk(start):]
            run = self.tiers.leading_run(keys)
            got = self.tiers.read_each(keys[: len(run)], consume) if run else 0
        metrics.RETRIEVED_TOKENS.inc(got * self.config.chunk_size)
        return got * self.config.chunk_size

    def open_chunks(self, token_ids=None, *, start: int = 0, mode: str = "prefix", namespace: str | None = None,
                    keys: Sequence[ChunkKey] | None = None) -> list[Held]:
        """The leading run of chunks (from `start`) as `Held` chunks: `.tensor` is the chunk's staging tensor
        on the device of the tier holding it (a memory tier's own entry, not reused until `.close()`, so it
        may be copied out asynchronously), `.position` where its first token was computed (None: not
        recorded). Read them, never modify them, close every one. token_ids None: `keys` are the chunks."""
        with metrics.LATENCY.labels("retrieve").time():
            keys = self._keys(token_ids, mode, namespace, keys)[self._start_chunk(start):]
            held = self.tiers.open_each(keys)
        metrics.RETRIEVED_TOKENS.inc(len(held) * self.config.chunk_size)
        return held

    # -- segment chunks: stored with the position they were computed at, found at any position ----------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether any tier holds each key (no hit counted, nothing moved)."""
        return [t is not None for t in self.tiers.locate(keys)]

    def store_positioned(self, items: Sequence[tuple[ChunkKey, torch.Tensor, int]]) -> int:
        """Store chunks under explicit keys (`keys_of`), each a whole-chunk staging tensor
        `[L, KV, chunk_size, H, D]` with the position its first token was computed at (recorded with it,
        in the chunk header for disk and Redis). Returns chunks stored."""
        if not items:
            return 0
        for _, kv, position in items:
            self._check_kv(kv)
            if kv.shape[2] != self.config.chunk_size:
                raise ValueError(f"kv: expected one chunk of {self.config.chunk_size} tokens, got {kv.shape[2]}")
            if not isinstance(position, int) or position < 0:
                raise ValueError(f"position: expected a token position >= 0, got {position!r}")
        with metrics.LATENCY.labels("store").time():
            self.tiers.store([(key, kv) for key, kv, _ in items], positions=[p for _, _, p in items])
        metrics.STORED_TOKENS.inc(len(items) * self.config.chunk_size)
        return len(items)

    def retrieve_positioned(self, keys: Sequence[ChunkKey],
                            consume: Callable[[int, torch.Tensor, int | None], object]) -> int:
        """Hand chunk keys[i] in order to `consume(i, kv, position)` (as `retrieve_chunks` does; position:
        where its first token was computed, None when not recorded) while they are found; returns how many."""
        with metrics.LATENCY.labels("retrieve").time():
            got = self.tiers.read_each(list(keys), consume, with_position=True)
        metrics.RETRIEVED_TOKENS.inc(got * self.config.chunk_size)
        return got

    def pin(self, token_ids, *, mode: str = "prefix", namespace: str | None = None,
            keys: Sequence[ChunkKey] | None = None, ttl: float | None = None) -> int:
        """Pin the chunks: not evicted from L1/L2 until `unpin` (ttl None) or for `ttl` seconds, in every
        memory tier holding them, also after a promotion or a later store; chunks found only on disk or in
        Redis are brought into memory first. Returns tokens pinned now (pinned bytes are capped by
        max_hot_ratio). token_ids None: `keys` are the chunks."""
        keys = self._keys(token_ids, mode, namespace, keys)
        self.tiers.bring_into_memory(keys)
        return sum(self.tiers.pin(keys, ttl)) * self.config.chunk_size

    def unpin(self, token_ids, *, mode: str = "prefix", namespace: str | None = None,
              keys: Sequence[ChunkKey] | None = None) -> None:
        """The chunks are ordinary LRU entries again (neither pinned nor hot)."""
        self.tiers.unpin(self._keys(token_ids, mode, namespace, keys))

    def lookup_batch(self, token_lists: Sequence, *, mode: str = "prefix", namespace: str | None = None) -> list[int]:
        """`lookup` for many requests with one batched call per tier (shared prefixes asked once)."""
        per_request = [self.keys(t, mode=mode, namespace=namespace) for t in token_lists]
        unique = list(dict.fromkeys(k for keys in per_request for k in keys))
        where = dict(zip(unique, self.tiers.locate(unique)))
        cs, hits = self.config.chunk_size, []
        for keys in per_request:
            run = 0
            while run < len(keys) and where[keys[run]] is not None:
                run += 1
            hits.append(run * cs)
            metrics.LOOKUPS.inc()
            metrics.LOOKUP_TOKENS.inc(len(keys) * cs)
            metrics.HIT_TOKENS.inc(run * cs)
        return hits

    # -- single-flight ----------------------------------------------------------------------------------

    def claim(self, token_ids, *, owner: str | None = None, mode: str = "prefix",
              namespace: str | None = None, keys: Sequence[ChunkKey] | None = None) -> Claim:
        """Non-blocking single-flight step (see `ClaimState`). owner: who computes (e.g. a request id);
        defaults to this engine."""
        keys = self._keys(token_ids, mode, namespace, keys)
        hit = len(self.tiers.leading_run(keys))
        return Claim(self._claim_missing(keys[hit:], owner), hit * self.config.chunk_size)

    def _claim_missing(self, missing: Sequence[ChunkKey], owner: str | None) -> ClaimState:
        """The single-flight step for the chunks the tiers lack: one call to the locks (one pipelined Redis
        round trip at most)."""
        if not missing:
            return ClaimState.HIT
        grant = self.locks.claim(list(missing), self._owner(owner), ttl=self._lock_ttl)
        if grant.busy:
            metrics.LOCK_WAITS.inc()
            return ClaimState.BUSY
        return ClaimState.COMPUTE

    def wait_claim(self, token_ids, *, timeout: float | None = None, **kw) -> Claim:
        """Blocking form: wait up to `timeout` (default lock_timeout) while another owner computes."""
        deadline = time.monotonic() + (self.lock_timeout if timeout is None else timeout)
        while True:
            claim = self.claim(token_ids, **kw)
            if claim.state != ClaimState.BUSY:
                return claim
            if time.monotonic() >= deadline:
                metrics.LOCK_TIMEOUTS.inc()
                if self.fallback_on_timeout:
                    return Claim(ClaimState.COMPUTE, claim.hit_tokens)  # compute without the lock
                raise LockTimeoutError(f"another instance kept computing these chunks past "
                                       f"lock_timeout={self.lock_timeout}s (fallback_on_timeout is off)")
            time.sleep(_POLL_S)

    def release(self, token_ids, *, owner: str | None = None, mode: str = "prefix",
                namespace: str | None = None, keys: Sequence[ChunkKey] | None = None) -> None:
        """Give up the chunks `owner` claimed (its compute failed or was aborted)."""
        self.locks.release(self._keys(token_ids, mode, namespace, keys), self._owner(owner))

    def _owner(self, owner: str | None) -> str:
        return self.owner if owner is None else f"{self.owner}:{owner}"

    @property
    def _lock_ttl(self) -> float:
        """A claimed chunk's lock outlives lock_timeout (waiters give up first) but not a crashed owner."""
        return max(self.lock_timeout, 1.0) * 4

    # -- housekeeping -----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait for background writes and prefetches."""
        self.tiers.flush()

    def stats(self) -> dict:
        out = {}
        for tier in self.tiers.tiers:
            u = tier.usage()
            s = tier.stats
            out[tier.name] = dict(hits=s.hits, misses=s.misses, bytes_read=s.bytes_read,
                                  bytes_written=s.bytes_written, evictions=s.evictions, corrupt=s.corrupt,
                                  errors=dict(s.errors), used_bytes=u.used_bytes, capacity_bytes=u.capacity_bytes,
                                  entries=u.entries, pinned_bytes=u.pinned_bytes)
        return out

    def locks_held(self) -> int:
        """Single-flight locks this process holds for its owners now (0 once every claim was stored or
        released)."""
        return self._local_locks.held_count()

    def clear(self, memory_only: bool = False) -> None:
        """Remove every entry (memory_only: from L1 and L2 only; disk and Redis keep theirs)."""
        self.tiers.clear(memory_only=memory_only)

    def close(self) -> None:
        self.tiers.close()
        metrics.unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
