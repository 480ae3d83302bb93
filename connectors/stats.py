"""Connector statistics through vLLM's own metrics path, so they reach the server's /metrics.

Under `vllm serve` the connector runs in the EngineCore and worker processes while /metrics is served by the
API-server process, whose registry never sees their collectors. vLLM ships `KVConnectorStats` from both
connector halves to the front end each step (worker stats merged over the ranks) and hands them to
`build_prom_metrics`, which is how these reach /metrics:

Counted once per request by the scheduler half (never once per rank):
    vllm:lmcache_requests_total           requests looked up (once per request, preemptions included once)
    vllm:lmcache_lookup_tokens_total      full-chunk prompt tokens those requests asked for
    vllm:lmcache_hit_tokens_total         of those, tokens every rank's cache held at admission
    vllm:lmcache_loaded_tokens_total      tokens loaded into vLLM's cache (beyond vLLM's own prefix hits)
    vllm:lmcache_load_failed_tokens_total tokens whose load failed or did not verify (vLLM recomputed them)
    vllm:lmcache_stored_tokens_total      tokens of chunks handed to the workers to store
    vllm:lmcache_segment_loaded_tokens_total  of loaded_tokens, those from segment chunks (segment reuse)
    vllm:lmcache_segment_stored_tokens_total  tokens of segment chunks handed to the workers to store
    vllm:lmcache_lock_timeouts_total      waits for another owner's chunks that passed lock_timeout
    vllm:lmcache_hit_rate                 hit_tokens / lookup_tokens since start (gauge)
    vllm:lmcache_lookup_seconds           the scheduler's ask to the workers, per ask (histogram)
Per worker rank (label rank="<pp>/<tp>") and tier (label tier="L1".."L4"), sent at most once a second:
    vllm:lmcache_tier_used_bytes, _capacity_bytes, _entries, _pinned_bytes    (gauges)
    vllm:lmcache_tier_errors_total{kind}, vllm:lmcache_tier_corrupt_total     (counters: faults, each a miss)
    vllm:lmcache_disk_size_bytes, vllm:lmcache_disk_avail_bytes  (gauges: the filesystem under local_cache_dir)
deploy/prometheus/lmcache-alerts.yml alerts on these.
"""

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from .rank_cache import TIER_GAUGES

COUNTERS = ("requests", "lookup_tokens", "hit_tokens", "loaded_tokens", "load_failed_tokens", "stored_tokens",
            "segment_loaded_tokens", "segment_stored_tokens", "lock_timeouts")
_HELP = {
    "requests": "Requests looked up in the LMCache-core cache (once per request).",
    "lookup_tokens": "Full-chunk prompt tokens looked up.",
    "hit_tokens": "Looked-up tokens the cache held at admission (on every rank).",
    "loaded_tokens": "Tokens loaded from the cache into vLLM's KV cache.",
    "load_failed_tokens": "Tokens whose load failed or did not verify (recomputed by vLLM).",
    "stored_tokens": "Tokens of chunks handed to the cache to store.",
    "segment_loaded_tokens": "Of the loaded tokens, those from cached segments (position-independent reuse).",
    "segment_stored_tokens": "Tokens of segment chunks handed to the cache to store.",
    "lock_timeouts": "Waits for chunks another request or instance computes that passed lock_timeout.",
}
_LOOKUP_BUCKETS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.5, 1.0)
_MAX_LOOKUPS = 4096  # lookup times kept between two takes (a histogram gets them each step)


@dataclass
class LMCacheCoreStats(KVConnectorStats):
    """Counters since the last `take` (what vLLM ships each step), plus `totals` since start (never reset).
    data: the counters, "lookup_seconds" (a list), "tiers" (`RankCache.tier_snapshot`s, newest wins)."""

    data: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def add(self, name: str, value: int) -> None:
        assert name in COUNTERS, f"unknown connector counter {name}"
        self.data[name] = self.data.get(name, 0) + int(value)
        self.totals[name] = self.totals.get(name, 0) + int(value)

    def observe_lookup(self, seconds: float) -> None:
        times = self.data.setdefault("lookup_seconds", [])
        if len(times) < _MAX_LOOKUPS:
            times.append(seconds)

    def set_tiers(self, snapshot: dict) -> None:
        self.data["tiers"] = {**self.data.get("tiers", {}), **snapshot}

    def reset(self):
        self.data = {}

    def aggregate(self, other: "KVConnectorStats") -> "LMCacheCoreStats":
        data = other.data or {}
        for name in COUNTERS:
            if data.get(name):
                self.add(name, data[name])
        for seconds in data.get("lookup_seconds", ()):
            self.observe_lookup(seconds)
        if data.get("tiers"):
            self.set_tiers(data["tiers"])
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {name: self.data.get(name, 0) for name in COUNTERS}
        asked = out["lookup_tokens"]
        out["hit_rate"] = round(out["hit_tokens"] / asked, 4) if asked else 0.0
        times = sorted(self.data.get("lookup_seconds", ()))
        if times:
            out["lookup_ms_p50"] = round(times[len(times) // 2] * 1e3, 3)
            out["lookup_ms_max"] = round(times[-1] * 1e3, 3)
        return out

    def is_empty(self) -> bool:
        return not (any(self.data.get(name) for name in COUNTERS) or self.data.get("lookup_seconds")
                    or self.data.get("tiers"))

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
        self._fault_totals: dict[tuple, int] = {}
        counters = {name: self._counter_cls(name=f"vllm:lmcache_{name}", documentation=_HELP[name],
                                            labelnames=labelnames) for name in COUNTERS}
        gauge = self._gauge_cls(name="vllm:lmcache_hit_rate", documentation="Hit tokens / looked-up tokens.",
                                labelnames=labelnames, multiprocess_mode="mostrecent")
        lookup = self._histogram_cls(name="vllm:lmcache_lookup_seconds", labelnames=labelnames,
                                     documentation="The scheduler's lookup of one request in the workers' caches.",
                                     buckets=_LOOKUP_BUCKETS)
        tier_labels = [*labelnames, "rank", "tier"]
        self._tier_gauges = {g: self._gauge_cls(name=f"vllm:lmcache_tier_{g}", labelnames=tier_labels,
                                                documentation=f"Cache tier {g.replace('_', ' ')} of one worker.",
                                                multiprocess_mode="mostrecent") for g in TIER_GAUGES}
        self._tier_errors = self._counter_cls(name="vllm:lmcache_tier_errors", labelnames=[*tier_labels, "kind"],
                                              documentation="Cache tier faults by kind (each one was a miss).")
        self._tier_corrupt = self._counter_cls(name="vllm:lmcache_tier_corrupt", labelnames=tier_labels,
                                               documentation="Stored chunks that failed verification (deleted).")
        self._disk = {k: self._gauge_cls(name=f"vllm:lmcache_disk_{k}_bytes", labelnames=[*labelnames, "rank"],
                                         documentation=f"{k.capitalize()} bytes of the filesystem under the disk "
                                         "tier's directory.", multiprocess_mode="mostrecent") for k in ("size", "avail")}
        self._values = per_engine_labelvalues
        self._counters = {(idx, name): metric.labels(*values) for idx, values in per_engine_labelvalues.items()
                          for name, metric in counters.items()}
        self._hit_rate = {idx: gauge.labels(*values) for idx, values in per_engine_labelvalues.items()}
        self._lookup = {idx: lookup.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        totals = self._totals.setdefault(engine_idx, dict.fromkeys(COUNTERS, 0))
        for name in COUNTERS:
            value = int(transfer_stats_data.get(name, 0))
            if value:
                self._counters[(engine_idx, name)].inc(value)
                totals[name] += value
        if totals["lookup_tokens"]:
            self._hit_rate[engine_idx].set(totals["hit_tokens"] / totals["lookup_tokens"])
        for seconds in transfer_stats_data.get("lookup_seconds", ()):
            self._lookup[engine_idx].observe(seconds)
        values = self._values[engine_idx]
        for rank, tiers in (transfer_stats_data.get("tiers") or {}).items():
            for tier, s in tiers.items():
                labels = (*values, rank, tier)
                for g in TIER_GAUGES:
                    self._tier_gauges[g].labels(*labels).set(s[g])
                self._count(self._tier_corrupt.labels(*labels), (engine_idx, rank, tier), s["corrupt"])
                for kind, n in s["errors"].items():
                    self._count(self._tier_errors.labels(*labels, kind), (engine_idx, rank, tier, kind), n)
                if "fs_size_bytes" in s:
                    self._disk["size"].labels(*values, rank).set(s["fs_size_bytes"])
                    self._disk["avail"].labels(*values, rank).set(s["fs_avail_bytes"])

    def _count(self, counter, key: tuple, total: int) -> None:
        """Advance `counter` to a worker's cumulative `total` (a restarted worker starts again from 0)."""
        seen = self._fault_totals.get(key, 0)
        counter.inc(total - seen if total >= seen else total)
        self._fault_totals[key] = total
