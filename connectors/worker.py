"""The worker half: moves KV between vLLM's paged cache and the cache engine, as the scheduler planned.

Loads: `engine.retrieve_chunks` hands over the chunks covering the range one by one, straight from the tier
holding each (a memory tier's own entry: no staging copy), and each goes into the planned slots with one
`scatter_kv` for every layer (a chunk held off the cache's device is copied onto it first). They run in
`start_load_kv`, which vLLM calls before the forward pass when the step has synchronous loads
(`SchedulerOutput.has_sync_kv_loads`, set whenever a request admitted this step has external tokens; after
the forward otherwise), and, in case a caller orders it differently, in the first `wait_for_layer_load`,
before any attention layer reads a block. A load that comes back short
(evicted, corrupt, tier down) zeroes the slots it could not fill and reports their blocks through
`get_block_ids_with_load_errors`, so vLLM recomputes them; that request's saves in the same step are skipped
(its new KV attended to the missing tokens), and so are later ones until a step's metadata says the
scheduler has seen the failure and planned them again (with async scheduling a step is planned before the
previous one's results are in).
Saves: in `wait_for_save`, after the forward pass wrote this step's KV: one `gather_kv` of the chunks'
slots, every layer, then `engine.store` (memory tiers now, disk/Redis in the engine's background writer).
"""

import logging
import re
from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from kernels import KVLayoutError, gather_kv, scatter_kv
from kernels.paged_kv import resolve_paged

from . import registry
from .layouts import detect_layout
from .metadata import LMCacheCoreMetadata
from .segment_io import TokenMover, padded, rerotate
from .segments import rope_params
from .spec import ConnectorSettings, attention_spec, backend_name, configured_layout, kv_spec, vllm_layout_name
from .stats import LMCacheCoreStats

log = logging.getLogger(__name__)


@dataclass
class LMCacheCoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: requests whose load failed, and the first position that failed."""

    failed_loads: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "LMCacheCoreWorkerMeta":
        for req_id, pos in getattr(other, "failed_loads", {}).items():
            self.failed_loads[req_id] = min(pos, self.failed_loads.get(req_id, pos))
        return self


def _layer_order(name: str) -> tuple:
    """Layers in model order: by the integers in their names ("layers.10" after "layers.9"), then name."""
    return tuple(int(n) for n in re.findall(r"\d+", name)), name


class WorkerHalf:
    def __init__(self, vllm_config, kv_cache_config, settings: ConnectorSettings):
        self.vllm_config, self.kv_cache_config, self.settings = vllm_config, kv_cache_config, settings
        self.block_size = attention_spec(kv_cache_config).block_size
        self.engine = None
        self.caches = None  # what the kernels read: per-layer views (or one tensor for cross-layer layouts)
        self.layout = None
        self.stats = LMCacheCoreStats()
        self._loaded_meta = None  # the metadata whose loads already ran this step
        self._failed_blocks: set[int] = set()
        self._failed_loads: dict[str, int] = {}  # this step's: request -> first position that did not load
        self._no_saves: set[str] = set()  # failed loads the scheduler has not re-planned yet
        self.mover: TokenMover | None = None  # segment reuse: per-token moves at any position
        self.rope = None  # segment reuse: the model's RoPE (refused at start-up when it cannot be re-rotated)

    # -- start-up -----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_order)
        tensors, seen = [], set()
        for name in names:  # layers sharing one cache (KV sharing) are moved once
            t = kv_caches[name]
            if (t.data_ptr(), tuple(t.shape), t.stride()) not in seen:
                seen.add((t.data_ptr(), tuple(t.shape), t.stride()))
                tensors.append(t)
        backend, vllm_layout = backend_name(self.vllm_config), vllm_layout_name(self.vllm_config, self.kv_cache_config)
        detected = detect_layout(backend, tuple(tensors[0].shape), vllm_layout)
        expected = configured_layout(self.vllm_config, self.kv_cache_config)
        if detected != expected:
            raise KVLayoutError(f"kv cache: the tensors vLLM registered are in layout {detected.name!r}, but its "
                                f"configuration implies {expected.name!r} (backend {backend}, {vllm_layout}); "
                                "the scheduler would look up other keys than the worker stores")
        self.layout = detected.kv_layout
        if self.layout.has_layers:
            if len(tensors) != 1:
                raise KVLayoutError(f"kv cache: layout {detected.name} holds every layer in one tensor, got "
                                    f"{len(tensors)} tensors")
            self.caches = detected.view(tensors[0])
        else:
            self.caches = [detected.view(t) for t in tensors]
        pk = resolve_paged(self.caches, self.layout)  # the kernels' own validation, once, at start-up
        spec = kv_spec(self.vllm_config, self.kv_cache_config, self.settings.cache, detected, self._tp_rank())
        attn = attention_spec(self.kv_cache_config)
        got = (pk.num_layers, pk.num_kv, pk.num_heads if pk.has_heads else 1, pk.head_dim,
               str(pk.dtype).removeprefix("torch."))
        want = (spec.num_layers, spec.num_kv, spec.num_heads, spec.head_dim, spec.dtype)
        if got != want or self.block_size % pk.block_size:
            raise KVLayoutError(f"kv cache: tensors give (layers, kv, heads, head dim, dtype) = {got} and kernel "
                                f"block {pk.block_size}; the configuration says {want} and block {attn.block_size}")
        self.engine = registry.shared_engine(self.settings.cache, spec, device=pk.base.device)
        if self.settings.cache.segment_reuse:
            self.rope = rope_params(self.vllm_config, pk.head_dim)
            self.mover = TokenMover(self.caches, self.layout, cpu_blocks=detected.whole_blocks,
                                    block_size=self.block_size)
        log.info("lmcache: %d layers, backend %s, vLLM layout %s -> %s, chunk %d tokens", pk.num_layers, backend,
                 vllm_layout, detected.name, spec.chunk_size)

    @staticmethod
    def _tp_rank() -> int:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        try:
            return get_tensor_model_parallel_rank()
        except AssertionError:  # no model-parallel group (a bare unit test)
            return 0

    # -- loads --------------------------------------------------------------------------------------------

    def load(self, meta: LMCacheCoreMetadata) -> None:
        if meta is self._loaded_meta or not (meta.loads or meta.segment_loads):
            return
        self._loaded_meta = meta
        for spec in meta.loads:
            self._load_one(spec)
        for spec in meta.segment_loads:
            self._load_segments(spec)

    def _load_one(self, spec) -> None:
        engine, device = self.engine, self.engine.device
        cs = engine.config.chunk_size
        base = spec.start // cs * cs  # chunk holding spec.start
        slots = spec.slots.to(device)
        loaded = spec.start  # positions [spec.start, loaded) are in vLLM's blocks

        def scatter_chunk(i: int, kv: torch.Tensor) -> None:  # chunk i from base: [first, first + cs)
            nonlocal loaded
            first = base + i * cs
            lo, hi = max(spec.start, first), min(spec.end, first + cs)
            if lo < hi:
                part = kv[:, :, lo - first:hi - first].to(device)  # a no-op on the cache's device
                scatter_kv(part, self.caches, slots[lo - spec.start:hi - spec.start], self.layout, validate=False)
            loaded = max(loaded, hi)

        try:
            engine.retrieve_chunks(spec.token_ids, scatter_chunk, start=base, namespace=spec.namespace)
        except Exception as e:  # a tier fault is a miss, never an error for the request
            log.warning("lmcache: retrieve for request %s failed: %r", spec.req_id, e)
        good = loaded
        if good < spec.end:
            self._fail(spec, good, slots[good - spec.start:])
        self.stats.add("loaded_tokens", good - spec.start)

    def _fail(self, spec, good: int, bad: torch.Tensor) -> None:
        """Never leave stale bytes where vLLM was promised KV: zero positions [good, spec.end), report them."""
        engine = self.engine
        zeros = torch.zeros(engine.spec.chunk_shape(bad.numel()), dtype=getattr(torch, engine.spec.dtype),
                            device=bad.device)
        if self.mover is not None:
            self.mover.scatter(zeros, bad)
        else:
            scatter_kv(zeros, self.caches, bad, self.layout, validate=False)
        self._failed_blocks.update((bad // self.block_size).unique().tolist())
        self._failed_loads[spec.req_id] = min(good, self._failed_loads.get(spec.req_id, good))
        self._no_saves.add(spec.req_id)
        self.stats.add("load_failed_tokens", spec.end - good)
        log.warning("lmcache: request %s: loaded %d of %d tokens; vLLM recomputes the rest", spec.req_id,
                    good - spec.start, spec.end - spec.start)

    def _load_segments(self, spec) -> None:
        """Cached segment chunks into positions [spec.start, spec.end), K re-rotated to those positions."""
        device = self.engine.device
        slots = spec.slots.to(device)
        loaded = spec.start

        def place(i: int, kv: torch.Tensor, stored_at: int) -> None:
            nonlocal loaded
            _, first, length = spec.chunks[i]
            if stored_at < 0:
                raise ValueError(f"segment chunk {i} has no recorded position")
            lo, hi = max(spec.start, first), min(spec.end, first + length)
            part = kv[:, :, lo - first:hi - first].to(device, copy=True)  # the entry itself stays untouched
            if self.settings.segment_rerotate:
                rerotate(part, stored_at + lo - first, lo, self.rope)
            self.mover.scatter(part, slots[lo - spec.start:hi - spec.start])
            loaded = hi

        if spec.req_id not in self._failed_loads:  # its prefix came back short: nothing after it is valid
            try:
                self.engine.retrieve_positioned([key for key, _, _ in spec.chunks], place)
            except Exception as e:  # a tier fault is a miss, never an error for the request
                log.warning("lmcache: segment load for request %s failed: %r", spec.req_id, e)
        if loaded < spec.end:
            self._fail(spec, loaded, slots[loaded - spec.start:])
        self.stats.add("loaded_tokens", loaded - spec.start)
        self.stats.add("segment_loaded_tokens", loaded - spec.start)

    # -- saves --------------------------------------------------------------------------------------------

    def save(self, meta: LMCacheCoreMetadata) -> None:
        cs = self.engine.config.chunk_size if self.engine is not None else 0
        self._no_saves -= meta.failures_seen - self._failed_loads.keys()
        for spec in meta.saves:
            if spec.req_id in self._no_saves:
                continue  # its new KV attended to tokens that did not load: never store it
            first = spec.first_new_chunk * cs  # chunks before it were stored in an earlier step
            kv = gather_kv(self.caches, spec.slots[first:].to(self.engine.device), self.layout, validate=False)
            try:
                self.engine.store(spec.token_ids, kv, start=first, namespace=spec.namespace)
            except Exception as e:  # a full or failing tier loses a cache entry, not the request
                log.warning("lmcache: store for request %s failed: %r", spec.req_id, e)
                continue
            self.stats.add("stored_tokens", len(spec.token_ids) - spec.first_new_chunk * cs)
        for spec in meta.segment_saves:
            if spec.req_id not in self._no_saves:
                self._save_segments(spec, cs)

    def _save_segments(self, spec, chunk_size: int) -> None:
        """Store this prompt's computed segment chunks with the positions they were computed at."""
        try:
            items = [(key, padded(self.mover.gather(slots.to(self.engine.device)), chunk_size), first)
                     for (key, first, _), slots in zip(spec.chunks, spec.slots)]
            self.engine.store_positioned(items)
        except Exception as e:  # a full or failing tier loses a cache entry, not the request
            log.warning("lmcache: segment store for request %s failed: %r", spec.req_id, e)
            return
        self.stats.add("segment_stored_tokens", sum(length for _, _, length in spec.chunks))

    # -- step results -------------------------------------------------------------------------------------

    def take_failed_blocks(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def take_worker_meta(self) -> LMCacheCoreWorkerMeta | None:
        failed, self._failed_loads = self._failed_loads, {}
        return LMCacheCoreWorkerMeta(failed) if failed else None

    def take_stats(self) -> LMCacheCoreStats | None:
        return self.stats.take()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.flush()  # the engine stays registered: a later instance in this process reuses it
