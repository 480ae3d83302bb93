"""LMCacheCoreConnector: the vLLM v1 KV connector, a thin facade over a scheduler half and a worker half.

    vllm serve MODEL --kv-transfer-config \\
      '{"kv_connector":"LMCacheCoreConnector","kv_connector_module_path":"connectors.vllm_v1","kv_role":"kv_both"}'

Settings: CacheConfig.load (LMCACHE_CONFIG_FILE, LMCACHE_* variables), overridden by
`kv_connector_extra_config` (whose `kv_load_failure_policy` key the connector reads itself). Installed as a
package, `register` (entry point group `vllm.general_plugins`) makes the name work without the module path.

A cache fault must cost a recompute, not a request: unless extra config says `"kv_load_failure_policy":
"fail"`, the connector sets vLLM's `kv_load_failure_policy` to "recompute" (vLLM's default, "fail", is meant
for P/D transfers, and vLLM reads it right after building the scheduler-side connector).
"""

import logging
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

from .logs import attach_to_vllm_logging
from .scheduler import SchedulerHalf
from .settings import load_settings
from .stats import LMCacheCorePromMetrics, LMCacheCoreStats
from .worker import WorkerHalf

log = logging.getLogger(__name__)

CONNECTOR_NAMES = ("LMCacheCoreConnector", "lmcacheconnector")


class LMCacheCoreConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        attach_to_vllm_logging()
        settings = load_settings(self._kv_transfer_config.kv_connector_extra_config)
        self._scheduler: SchedulerHalf | None = None
        self._worker: WorkerHalf | None = None
        if role == KVConnectorRole.SCHEDULER:
            if self._kv_transfer_config.kv_load_failure_policy != settings.kv_load_failure_policy:
                log.info("lmcache: kv_load_failure_policy=%s (a failed cache load is recomputed)",
                         settings.kv_load_failure_policy)
                self._kv_transfer_config.kv_load_failure_policy = settings.kv_load_failure_policy
            self._scheduler = SchedulerHalf(vllm_config, kv_cache_config, settings)
        else:
            self._worker = WorkerHalf(vllm_config, kv_cache_config, settings)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss, never a wrong answer

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layer-wise loads and saves run between attention layers: a full CUDA graph would skip them.
        return load_settings(extra_config).cache.layerwise != "off"

    # -- worker side --------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches):
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        self._worker.save_kv_layer(layer_name, self._get_connector_metadata())

    def wait_for_save(self):
        if self.has_connector_metadata():
            self._worker.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids):
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        return None, (self._worker.get_finished(meta) or None)  # saves hold no blocks past their step

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_failed_blocks()

    def build_connector_worker_meta(self):
        return self._worker.take_worker_meta()

    def shutdown(self):
        half = self._worker if self._worker is not None else self._scheduler
        if half is not None:
            half.shutdown()

    # -- both ---------------------------------------------------------------------------------------------

    def get_kv_connector_stats(self):
        half = self._scheduler if self._scheduler is not None else self._worker
        return half.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return LMCacheCoreStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return LMCacheCorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # -- scheduler side -----------------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler.kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request, num_external_tokens: int):
        return self._scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        return self._scheduler.request_finished(request)

    def reset_cache(self) -> bool:
        return self._scheduler.reset_cache()  # the workers' memory tiers; disk and Redis are shared, kept


def register() -> None:
    """vLLM plugin (entry point group `vllm.general_plugins`): make our connector known by name.

    Both names select it: "LMCacheCoreConnector", and "lmcacheconnector", the name deployment guides for this
    library use (vLLM's own "LMCacheConnectorV1" is a different connector, LMCache's). Idempotent: vLLM loads
    general plugins in every process it starts, sometimes more than once.
    """
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name in CONNECTOR_NAMES:
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, __name__, "LMCacheCoreConnector")
