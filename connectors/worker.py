"""The worker half: vLLM's worker hooks on top of this rank's cache (connectors/rank_cache.py).

Start-up (`register_kv_caches`): the layout and the KV spec (with this rank's parallel position: TP rank,
pipeline stage, the stage's first layer) are checked against the tensors vLLM hands over; the memory tiers
are sized inside what vLLM left (`budget.plan_memory`) and allocated; the engine is built and the rank's
cache starts answering lookups on its socket; one log line says what this process runs with. The engine
lives until vLLM shuts the worker down. Each step's hooks go to the rank cache; what a step loaded (and how
far) goes back to the scheduler as worker metadata, failed blocks through `get_block_ids_with_load_errors`.
"""

import logging
import re
from dataclasses import dataclass, field, replace

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from kernels import KVLayoutError
from kernels.paged_kv import resolve_paged
from lmcache_core import CacheEngine
from lmcache_core.budget import plan_memory

from .vllm_layouts import detect_layout
from .lookup import socket_path
from .plan import StepPlan
from .rank_cache import RankCache
from .segment_io import TokenMover
from .segments import rope_params
from .settings import ConnectorSettings
from .vllm_config import attention_spec, backend_name, configured_layout, kv_spec, vllm_layout_name, worker_rank
from .startup import describe_engine, warm_up_kernels
from .stats import LMCacheCoreStats

log = logging.getLogger(__name__)


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
        self.rank: RankCache | None = None
        self._layer_index: dict[str, int] = {}
        self._loaded_plan = None  # the plan whose loads already started this step

    @property
    def engine(self) -> CacheEngine | None:
        return self.rank.engine if self.rank is not None else None

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
        layout = detected.kv_layout
        if layout.has_layers:
            if len(tensors) != 1:
                raise KVLayoutError(f"kv cache: layout {detected.name} holds every layer in one tensor, got "
                                    f"{len(tensors)} tensors")
            caches = detected.view(tensors[0])
        else:
            caches = [detected.view(t) for t in tensors]
        pk = resolve_paged(caches, layout)  # the kernels' own validation, once, at start-up
        pp_rank, tp_rank = worker_rank()
        first_layer = min((_layer_order(n)[0][:1] or (0,))[0] for n in names)
        spec = kv_spec(vc, kc, self.settings.cache, detected, tp_rank=tp_rank, pp_rank=pp_rank, first_layer=first_layer)
        got = (pk.num_layers, pk.num_kv, pk.num_heads if pk.has_heads else 1, pk.head_dim,
               str(pk.dtype).removeprefix("torch."))
        want = (spec.num_layers, spec.num_kv, spec.num_heads, spec.head_dim, spec.dtype)
        if got != want or self.block_size % pk.block_size:
            raise KVLayoutError(f"kv cache: tensors give (layers, kv, heads, head dim, dtype) = {got} and kernel "
                                f"block {pk.block_size}; the configuration says {want} and block {self.block_size}")
        cache, device, par = self.settings.cache, pk.base.device, vc.parallel_config
        mover = rope = None
        if cache.segment_reuse:  # refuses models it cannot re-rotate, before anything is allocated
            rope = rope_params(vc, pk.head_dim)
            mover = TokenMover(caches, layout, cpu_blocks=detected.whole_blocks, block_size=self.block_size)
        kv_bytes = sum(t.numel() * t.element_size() for t in tensors)
        plan = plan_memory(cache, device, workers=max(1, par.local_world_size),  # this instance's workers here
                           reserved_by=f"vLLM's KV cache ({kv_bytes / 2**30:.2f} GiB on this worker)",
                           knobs="lower VLLM_CPU_KVCACHE_SPACE" if device.type == "cpu" else
                           "lower --gpu-memory-utilization")
        if cache.metrics_port is not None:  # one /metrics per worker process: the port plus the rank's index
            cache = replace(cache, metrics_port=cache.metrics_port + pp_rank * par.tensor_parallel_size + tp_rank)
        engine = CacheEngine(cache, spec=spec, device=device, memory=plan)
        try:
            warm_up_kernels(caches, layout, engine)
            socket = socket_path(vc.kv_transfer_config.engine_id, par.data_parallel_rank, pp_rank, tp_rank)
            layerwise = cache.layerwise == "on" or (cache.layerwise == "auto" and device.type == "cuda")
            self.rank = RankCache(engine, caches, layout, block_size=self.block_size, socket=socket,
                                  lead=(pp_rank, tp_rank) == (0, 0), layerwise=layerwise, mover=mover, rope=rope,
                                  rerotate_segments=self.settings.segment_rerotate)
        except BaseException:
            engine.close()
            raise
        log.info("lmcache: worker pp %d/%d tp %d/%d: %s; %d layers from %d, backend %s, layout %s -> %s, "
                 "layer-wise %s, lookups on %s", pp_rank, par.pipeline_parallel_size, tp_rank,
                 par.tensor_parallel_size, describe_engine(engine), pk.num_layers, first_layer, backend,
                 vllm_layout, detected.name, "on" if layerwise else "off", socket)

    # -- each step ----------------------------------------------------------------------------------------

    def start_load_kv(self, plan: StepPlan) -> None:
        if plan is not self._loaded_plan:
            self._loaded_plan = plan
            self.rank.start_loads(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.rank.wait_for_layers(self._layer_index.get(layer_name, 0) + 1)

    def save_kv_layer(self, layer_name: str, plan: StepPlan) -> None:
        if self.rank.layerwise:
            self.rank.save_layers(plan, self._layer_index.get(layer_name, 0) + 1)

    def wait_for_save(self, plan: StepPlan) -> None:
        self.rank.finish_saves(plan)

    def get_finished(self, plan: StepPlan | None) -> set[str]:
        return self.rank.finished(plan)

    def take_failed_blocks(self) -> set[int]:
        return self.rank.failed_blocks()

    def take_worker_meta(self) -> LMCacheCoreWorkerMeta | None:
        outcomes = self.rank.take_outcomes()
        return LMCacheCoreWorkerMeta({o.req_id: o.upto for o in outcomes}) if outcomes else None

    def take_stats(self) -> LMCacheCoreStats | None:
        """This rank's tier usage (once a second): request-level figures are the scheduler's."""
        snapshot = self.rank.tier_snapshot() if self.rank is not None else None
        return LMCacheCoreStats({"tiers": snapshot}) if snapshot else None

    def shutdown(self) -> None:
        if self.rank is not None:
            self.rank.close()
            self.rank = None
