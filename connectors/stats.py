"""Connector statistics through vLLM's own metrics path, so they reach `vllm serve`'s /metrics.

Why not just the default Prometheus registry: under `vllm serve` the connector runs in the EngineCore
process while /metrics is served by the API-server process, whose registry never sees the EngineCore's
collectors (lmcache_core.metrics there is only visible on the engine's own `metrics_port`). vLLM ships
`KVConnectorStats` from both connector halves to the front end each step and hands them to
`build_prom_metrics`, which is how these counters get onto /metrics:

    vllm:lmcache_requests_total           requests looked up (once per request, preemptions included once)
    vllm:lmcache_lookup_tokens_total      full-chunk prompt tokens those requests asked for
    vllm:lmcache_hit_tokens_total         of those, tokens our cache held at admission
    vllm:lmcache_loaded_tokens_total      tokens scattered into vLLM's cache (beyond vLLM's own prefix hits)
    vllm:lmcache_load_failed_tokens_total tokens whose load failed or did not verify (vLLM recomputed them)
    vllm:lmcache_stored_tokens_total      tokens of chunks handed to the cache engine to store
    vllm:lmcache_segment_loaded_tokens_total  of loaded_tokens, those from segment chunks (segment reuse)
    vllm:lmcache_segment_stored_tokens_total  tokens of segment chunks handed to the cache to store
    vllm:lmcache_hit_rate                 hit_tokens / lookup_tokens since start (gauge)
"""

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

COUNTERS = ("requests", "lookup_tokens", "hit_tokens", "loaded_tokens", "load_failed_tokens", "stored_tokens",
            "segment_loaded_tokens", "segment_stored_tokens")
_HELP = {
    "requests": "Requests looked up in the LMCache-core cache (once per request).",
    "lookup_tokens": "Full-chunk prompt tokens looked up.",
    "hit_tokens": "Looked-up tokens the cache held at admission.",
    "loaded_tokens": "Tokens loaded from the cache into vLLM's KV cache.",
    "load_failed_tokens": "Tokens whose load failed or did not verify (recomputed by vLLM).",
    "stored_tokens": "Tokens of chunks handed to the cache to store.",
    "segment_loaded_tokens": "Of the loaded tokens, those from cached segments (position-independent reuse).",
    "segment_stored_tokens": "Tokens of segment chunks handed to the cache to store.",
}


@dataclass
class LMCacheCoreStats(KVConnectorStats):
    """Counters since the last `take` (what vLLM ships each step), plus `totals` since start (never reset)."""

    data: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def add(self, name: str, value: int) -> None:
        assert name in COUNTERS, f"unknown connector counter {name}"
        self.data[name] = self.data.get(name, 0) + int(value)
        self.totals[name] = self.totals.get(name, 0) + int(value)

    def reset(self):
        self.data = {}

    def aggregate(self, other: "KVConnectorStats") -> "LMCacheCoreStats":
        for name, value in (other.data or {}).items():
            if name in COUNTERS:
                self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {name: self.data.get(name, 0) for name in COUNTERS}
        asked = out["lookup_tokens"]
        out["hit_rate"] = round(out["hit_tokens"] / asked, 4) if asked else 0.0
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(name) for name in COUNTERS)

    def take(self) -> "LMCacheCoreStats | None":
        """A snapshot of what was counted since the last call (None when nothing), and a fresh start."""
        if self.is_empty():
            return None
        snapshot = LMCacheCoreStats(dict(self.data))
        self.reset()
        return snapshot


class LMCacheCorePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._totals: dict[int, dict[str, int]] = {}
        counters = {name: self._counter_cls(name=f"vllm:lmcache_{name}", documentation=_HELP[name],
                                            labelnames=labelnames) for name in COUNTERS}
        gauge = self._gauge_cls(name="vllm:lmcache_hit_rate", documentation="Hit tokens / looked-up tokens.",
                                labelnames=labelnames, multiprocess_mode="mostrecent")
        self._counters = {(idx, name): metric.labels(*values) for idx, values in per_engine_labelvalues.items()
                          for name, metric in counters.items()}
        self._hit_rate = {idx: gauge.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        totals = self._totals.setdefault(engine_idx, dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            value = int(transfer_stats_data.get(name, 0))
            if value:
                self._counters[(engine_idx, name)].inc(value)
                totals[name] += value
        if totals["lookup_tokens"]:
            self._hit_rate[engine_idx].set(totals["hit_tokens"] / totals["lookup_tokens"])
