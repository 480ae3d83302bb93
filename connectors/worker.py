"""The worker half: owns this rank's cache engine, answers the scheduler's lookups, and moves KV between
vLLM's paged cache and the engine as the scheduler planned.

Start-up (`register_kv_caches`): the layout and the KV spec (with this rank's parallel position) are checked
against the tensors vLLM hands over; the memory tiers are sized inside what vLLM left (`budget.plan_memory`)
and allocated; the engine is built; a lookup server starts on this rank's socket (connectors/lookup.py);
one log line says what this process runs with. The engine lives until vLLM shuts the worker down.

Each step (connectors/loads.py, connectors/saves.py):
- `start_load_kv`: background loads (chunks on disk or in Redis) go to the load thread, and their requests
  are released through `get_finished` when done; synchronous loads (every chunk in L1/L2) run now, before
  the forward pass, or, layer-wise, on the load thread while the forward pass runs (`wait_for_layer_load(i)`
  waits for layer i only). A load that comes back short zeroes what it could not fill and reports the
  blocks (`get_block_ids_with_load_errors`): vLLM recomputes them, and that request's saves are skipped until
  the scheduler has seen the failure and planned them again.
- `save_kv_layer` (layer-wise) / `wait_for_save`: the planned chunks are gathered and handed to the engine
  on the save thread.
"""

import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from kernels import KVLayoutError
from kernels.paged_kv import resolve_paged
from lmcache_core import CacheEngine
from lmcache_core.budget import plan_memory

from .device_streams import Streams
from .layouts import detect_layout
from .loads import LoadJob, LoadOutcome, Loader, close_all
from .lookup import LookupServer, socket_path
from .plan import StepPlan
from .saves import Saver
from .segment_io import TokenMover
from .segments import rope_params
from .spec import (ConnectorSettings, attention_spec, backend_name, configured_layout, kv_spec, vllm_layout_name,
                   worker_rank)
from .startup import describe_engine, warm_up_kernels
from .stats import LMCacheCoreStats, tier_snapshot

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.01  # a step with nothing to compute waits this long for a background load (no busy spin)


@dataclass
class LMCacheCoreWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: the loads this rank finished, and how far each got (the first position
    not loaded); over the ranks of one step the least is kept."""

    loads: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: "KVConnectorWorkerMetadata") -> "LMCacheCoreWorkerMeta":
        for req_id, upto in getattr(other, "loads", {}).items():
            self.loads[req_id] = min(upto, self.loads.get(req_id, upto))
        return self


def _layer_order(name: str) -> tuple:
    """Layers in model order: by the integers in their names ("layers.10" after "layers.9"), then name."""
    return tuple(int(n) for n in re.findall(r"\d+", name)), name


class WorkerHalf:
    def __init__(self, vllm_config, kv_cache_config, settings: ConnectorSettings):
        self.vllm_config, self.kv_cache_config, self.settings = vllm_config, kv_cache_config, settings
        self.block_size = attention_spec(kv_cache_config).block_size
        self.engine: CacheEngine | None = None
        self.server: LookupServer | None = None
        self.lead = False  # TP rank 0 of the first stage: makes the single-flight claims
        self.stats = LMCacheCoreStats()
        self._layer_index: dict[str, int] = {}
        self._loaded_meta = None  # the metadata whose loads already started this step
        self._layerwise: _LayerwiseLoad | None = None
        self._saves = None
        self._lock = threading.Condition()
        self._background: dict[str, Future] = {}
        self._done: list[LoadOutcome] = []  # background loads finished, not yet reported
        self._step_outcomes: list[LoadOutcome] = []  # this step's, reported by the hooks after the forward
        self._no_saves: set[str] = set()  # failed loads the scheduler has not re-planned yet
        self._last_snapshot = 0.0

    # -- start-up -----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_order)
        tensors, seen = [], {}
        for name in names:  # layers sharing one cache (KV sharing) are moved once
            t = kv_caches[name]
            ident = (t.data_ptr(), tuple(t.shape), t.stride())
            if ident not in seen:
                seen[ident] = len(tensors)
                tensors.append(t)
            self._layer_index[name] = seen[ident]
        vc, kc = self.vllm_config, self.kv_cache_config
        backend, vllm_layout = backend_name(vc), vllm_layout_name(vc, kc)
        detected = detect_layout(backend, tuple(tensors[0].shape), vllm_layout)
        expected = configured_layout(vc, kc)
        if detected != expected:
            raise KVLayoutError(f"kv cache: the tensors vLLM registered are in layout {detected.name!r}, but its "
                                f"configuration implies {expected.name!r} (backend {backend}, {vllm_layout})")
        self.layout = detected.kv_layout
        if self.layout.has_layers:
            if len(tensors) != 1:
                raise KVLayoutError(f"kv cache: layout {detected.name} holds every layer in one tensor, got "
                                    f"{len(tensors)} tensors")
            self.caches = detected.view(tensors[0])
        else:
            self.caches = [detected.view(t) for t in tensors]
        pk = resolve_paged(self.caches, self.layout)  # the kernels' own validation, once, at start-up
        pp_rank, tp_rank = worker_rank()
        self.lead = (pp_rank, tp_rank) == (0, 0)
        first_layer = min((_layer_order(n)[0][:1] or (0,))[0] for n in names)
        spec = kv_spec(vc, kc, self.settings.cache, detected, tp_rank=tp_rank, pp_rank=pp_rank, first_layer=first_layer)
        got = (pk.num_layers, pk.num_kv, pk.num_heads if pk.has_heads else 1, pk.head_dim,
               str(pk.dtype).removeprefix("torch."))
        want = (spec.num_layers, spec.num_kv, spec.num_heads, spec.head_dim, spec.dtype)
        if got != want or self.block_size % pk.block_size:
            raise KVLayoutError(f"kv cache: tensors give (layers, kv, heads, head dim, dtype) = {got} and kernel "
                                f"block {pk.block_size}; the configuration says {want} and block {self.block_size}")
        device = pk.base.device
        par = vc.parallel_config
        workers = par.local_world_size  # this instance's worker processes on this node (TP x PP / nodes)
        kv_bytes = sum(t.numel() * t.element_size() for t in tensors)
        plan = plan_memory(self.settings.cache, device, workers=max(1, workers),
                           reserved_by=f"vLLM's KV cache ({kv_bytes / 2**30:.2f} GiB on this worker)",
                           knobs="lower VLLM_CPU_KVCACHE_SPACE" if device.type == "cpu" else
                           "lower --gpu-memory-utilization")
        mover = rope = None
        if self.settings.cache.segment_reuse:  # refuses models it cannot re-rotate, before anything is allocated
            rope = rope_params(vc, pk.head_dim)
            mover = TokenMover(self.caches, self.layout, cpu_blocks=detected.whole_blocks, block_size=self.block_size)
        engine = CacheEngine(self.settings.cache, spec=spec, device=device, memory=plan)
        try:
            warm_up_kernels(self.caches, self.layout, engine)
        except BaseException:
            engine.close()
            raise
        self.engine, self.streams = engine, Streams(device)
        self.loader = Loader(engine, self.caches, self.layout, block_size=self.block_size, streams=self.streams,
                             mover=mover, rope=rope, rerotate_segments=self.settings.segment_rerotate)
        self.saver = Saver(engine, self.caches, self.layout, streams=self.streams, mover=mover)
        self.layerwise = self.settings.cache.layerwise == "on" or (self.settings.cache.layerwise == "auto"
                                                                   and device.type == "cuda")
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-load")
        self._releases = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-release")
        path = socket_path(vc.kv_transfer_config.engine_id, par.data_parallel_rank, pp_rank, tp_rank)
        self.server = LookupServer(path, self._answer)  # last: it answers with everything above
        log.info("lmcache: worker pp %d/%d tp %d/%d: %s; %d layers from %d, backend %s, layout %s -> %s, "
                 "layer-wise %s, lookups on %s", pp_rank, par.pipeline_parallel_size, tp_rank,
                 par.tensor_parallel_size, describe_engine(self.engine), pk.num_layers, first_layer, backend,
                 vllm_layout, detected.name, "on" if self.layerwise else "off", path)

    # -- the scheduler's questions (on the lookup server's thread) ----------------------------------------

    def _answer(self, op: str, header: dict, hashes: list[bytes]) -> dict:
        engine = self.engine
        keys = engine.keys_of(hashes)
        if op in ("ask", "contains"):
            self.saver.wait_for(hashes)  # chunks this worker is storing right now count as stored
        if op == "ask":
            owner = header.get("owner") if self.lead else None
            probe = engine.ask(keys, owner=owner, prefetch=bool(header.get("prefetch")))
            return {"tiers": list(probe.tiers), "claim": probe.claim.value if probe.claim is not None else None}
        if op == "contains":
            names = [t.name for t in engine.tiers.tiers]
            return {"tiers": [None if t is None else names[t] for t in engine.tiers.locate(keys)]}
        if op == "release":
            if self.lead:
                engine.release(None, owner=header["owner"], keys=keys)
            return {}
        if op == "reset":
            engine.clear(memory_only=True)
            return {"ok": True}
        raise ValueError(f"op: expected ask, contains, release or reset, got {op!r}")

    # -- loads --------------------------------------------------------------------------------------------

    def start_load_kv(self, meta: StepPlan) -> None:
        if meta is self._loaded_meta:
            return
        self._loaded_meta = meta
        jobs: dict[str, LoadJob] = {}
        for spec in meta.loads:
            jobs.setdefault(spec.req_id, LoadJob(spec.req_id)).prefix = spec
        for spec in meta.segment_loads:
            jobs.setdefault(spec.req_id, LoadJob(spec.req_id)).segments = spec
        now = [job for job in jobs.values() if not job.background]
        for job in jobs.values():
            if job.background:
                with self._lock:
                    self._background[job.req_id] = self._loads.submit(self._load_in_background, job)
        if not now:
            return
        if self.layerwise:
            self._layerwise = _LayerwiseLoad(self, now)
            return
        outcomes, held, event = self.loader.run(now, self.loader.all_layers())
        self.streams.wait(event)  # the forward pass reads the blocks after the copies, never waits on the host
        self._after(held, event)
        self._step_outcomes += outcomes

    def _after(self, held, event) -> None:
        """Close held chunks once the copies from them are done (on CUDA, off the forward thread)."""
        if event is None:
            close_all(held)
        else:
            self._releases.submit(lambda: (self.streams.synchronize(event), close_all(held)))

    def _load_in_background(self, job: LoadJob) -> None:
        try:
            outcomes, held, event = self.loader.run([job], self.loader.all_layers())
            self.streams.synchronize(event)
            close_all(held)
        except Exception as e:  # never leave the request waiting: report it failed from its start
            log.warning("lmcache: background load for request %s failed: %r", job.req_id, e)
            outcomes = [LoadOutcome(job.req_id, job.start, job.end, set())]
        with self._lock:
            self._done += outcomes
            self._lock.notify_all()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layerwise is not None:
            self._layerwise.wait(self._layer_index.get(layer_name, 0) + 1)

    # -- saves --------------------------------------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, meta: StepPlan) -> None:
        if not self.layerwise:
            return
        if self._saves is None:
            self._saves = self.saver.begin(meta, self._no_saves) or False
        if self._saves:
            self.saver.gather_layers(self._saves, self._layer_index.get(layer_name, 0) + 1)

    def wait_for_save(self, meta: StepPlan) -> None:
        self._finish_layerwise()
        self._no_saves -= meta.failures_seen - {o.req_id for o in self._step_outcomes if o.upto < o.end}
        self._no_saves |= {o.req_id for o in self._step_outcomes if o.upto < o.end}
        step = self._saves if self._saves is not None else self.saver.begin(meta, self._no_saves)
        self._saves = None
        if step:
            self.saver.finish(step)

    def _finish_layerwise(self) -> None:
        if self._layerwise is not None:
            self._step_outcomes += self._layerwise.join()
            self._layerwise = None

    # -- step results -------------------------------------------------------------------------------------

    def get_finished(self, meta: StepPlan | None) -> set[str]:
        """Requests whose background load finished since the last step (their outcomes join this step's)."""
        self._finish_layerwise()
        with self._lock:
            if meta is not None and meta.idle and self._background and not self._done:
                self._lock.wait(IDLE_WAIT_S)
            done, self._done = self._done, []
            for o in done:
                self._background.pop(o.req_id, None)
        self._no_saves |= {o.req_id for o in done if o.upto < o.end}
        self._step_outcomes += done
        return {o.req_id for o in done}

    def take_failed_blocks(self) -> set[int]:
        return set().union(*(o.failed_blocks for o in self._step_outcomes))

    def take_worker_meta(self) -> LMCacheCoreWorkerMeta | None:
        outcomes, self._step_outcomes = self._step_outcomes, []
        return LMCacheCoreWorkerMeta({o.req_id: o.upto for o in outcomes}) if outcomes else None

    def take_stats(self) -> LMCacheCoreStats | None:
        now = time.monotonic()
        if self.engine is not None and now - self._last_snapshot >= 1.0:  # tier gauges, once a second
            self._last_snapshot = now
            self.stats.set_tiers(tier_snapshot(self.engine, self.stats_label()))
        return self.stats.take()

    def stats_label(self) -> str:
        return f"{self.engine.spec.pp_rank}/{self.engine.spec.tp_rank}"

    def shutdown(self) -> None:
        """Stop answering lookups, finish every load and save in flight, write back and close the engine."""
        if self.engine is None:
            return
        if self.server is not None:
            self.server.close()
        self._finish_layerwise()
        self.saver.close()
        self._loads.shutdown(wait=True)
        self._releases.shutdown(wait=True)
        self.engine.close()
        self.engine = None


class _LayerwiseLoad:
    """One step's synchronous loads on the load thread, layer by layer: `wait(n)` returns once layers
    [0, n) are in vLLM's blocks (CPU) or enqueued with an event the forward stream now waits on (CUDA)."""

    def __init__(self, worker: WorkerHalf, jobs: list[LoadJob]):
        self.worker, self.jobs = worker, jobs
        self.ready = 0  # layers [0, ready) are loaded (or enqueued)
        self.events: dict[int, object] = {}
        self.cond = threading.Condition()
        self.future = worker._loads.submit(self._run)

    def _layers_done(self, upto: int) -> None:
        event = self.worker.streams.record(self.worker.streams.load)
        with self.cond:
            self.ready, self.events[upto] = upto, event
            self.cond.notify_all()

    def _run(self):
        loader = self.worker.loader
        try:
            return loader.run(self.jobs, loader.each_layer(), on_layers=self._layers_done)
        finally:
            with self.cond:
                self.ready = loader.num_layers
                self.cond.notify_all()

    def wait(self, upto: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.ready >= upto)
            event = self.events.get(self.ready)
        self.worker.streams.wait(event)

    def join(self) -> list[LoadOutcome]:
        outcomes, held, event = self.future.result()
        self.worker.streams.wait(event)
        self.worker._after(held, event)
        return outcomes
