"""Prometheus metrics, in prometheus-client's default registry (so an engine's own /metrics, e.g. vLLM's,
shows them too), and on `metrics_port` when configured.

Tier counters live as plain integers in each tier (`TierStats`); a collector reads every live engine's
tiers at scrape time and sums them per tier. Request-level figures (lookups, hit tokens, lock waits) and
latency histograms are updated by the engine as it works.
"""

import threading
import weakref

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)

LOOKUPS = Counter("lmcache_lookups", "Lookups answered (one per request prompt).")
LOOKUP_TOKENS = Counter("lmcache_lookup_tokens", "Full-chunk tokens asked for in lookups.")
HIT_TOKENS = Counter("lmcache_hit_tokens", "Tokens found in some tier by lookups.")
RETRIEVED_TOKENS = Counter("lmcache_retrieved_tokens", "Tokens copied out by retrieve.")
STORED_TOKENS = Counter("lmcache_stored_tokens", "Tokens of new chunks stored.")
LOCK_WAITS = Counter("lmcache_lock_waits", "Claims answered 'busy': another owner was computing the chunk.")
LOCK_TIMEOUTS = Counter("lmcache_lock_timeouts", "Waits that passed lock_timeout.")
LATENCY = Histogram("lmcache_op_seconds", "Latency of engine operations.", ["op"], buckets=_LATENCY_BUCKETS)

_engines: "weakref.WeakSet" = weakref.WeakSet()
_lock = threading.Lock()
_servers: dict[int, object] = {}
_TIER_COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "evictions", "corrupt")
_TIER_GAUGES = ("used_bytes", "capacity_bytes", "entries", "pinned_bytes")


class _TierCollector:
    """Sums the tier counters and usage of every live engine, per tier, at scrape time."""

    def collect(self):
        counters = {n: CounterMetricFamily(f"lmcache_tier_{n}", f"Tier {n.replace('_', ' ')}.", labels=["tier"])
                    for n in _TIER_COUNTERS}
        gauges = {n: GaugeMetricFamily(f"lmcache_tier_{n}", f"Tier {n.replace('_', ' ')}.", labels=["tier"])
                  for n in _TIER_GAUGES}
        errors = CounterMetricFamily("lmcache_tier_errors", "Tier faults by kind (each one was a miss).",
                                     labels=["tier", "kind"])
        totals: dict[str, dict] = {}
        for engine in list(_engines):
            for tier, s in engine.stats().items():
                t = totals.setdefault(tier, {"errors": {}})
                for n in _TIER_COUNTERS + _TIER_GAUGES:
                    t[n] = t.get(n, 0) + s[n]
                for kind, count in s["errors"].items():
                    t["errors"][kind] = t["errors"].get(kind, 0) + count
        for tier, t in sorted(totals.items()):
            for n in _TIER_COUNTERS:
                counters[n].add_metric([tier], t[n])
            for n in _TIER_GAUGES:
                gauges[n].add_metric([tier], t[n])
            for kind, count in sorted(t["errors"].items()):
                errors.add_metric([tier, kind], count)
        asked, hit = LOOKUP_TOKENS._value.get(), HIT_TOKENS._value.get()
        rate = GaugeMetricFamily("lmcache_hit_rate", "Hit tokens / looked-up tokens since start.")
        rate.add_metric([], hit / asked if asked else 0.0)
        yield from counters.values()
        yield from gauges.values()
        yield errors
        yield rate

    def describe(self):
        return []  # collected lazily; nothing to check at registration


_collector = _TierCollector()
REGISTRY.register(_collector)


def register(engine, port: int | None) -> None:
    """Include `engine` in scrapes; serve /metrics on `port` (once per process and port)."""
    _engines.add(engine)
    if port is None:
        return
    with _lock:
        if port not in _servers:
            _servers[port] = start_http_server(port)
