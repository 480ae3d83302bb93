"""Prometheus metrics of the cache engines of this process: added to prometheus-client's default registry
when the process creates its first engine (never at import: a process that only imports the package, like
vLLM's API server, shows no lmcache_* line), and served on `metrics_port` when configured.

Tier counters live as plain integers in each tier (`TierStats`); a collector reads every live engine's
tiers at scrape time and sums them per tier. Request-level figures (lookups, hit tokens, lock waits) and
latency histograms are updated by the engine as it works. Under vLLM the connector ships its own figures to
the server's /metrics (connectors/stats.py); these are the engine's view, per process.
"""

import logging
import threading
import weakref

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)

# Created unregistered (registry=None); `register` adds them to the default registry with the first engine.
LOOKUPS = Counter("lmcache_lookups", "Lookups answered (one per request prompt).", registry=None)
LOOKUP_TOKENS = Counter("lmcache_lookup_tokens", "Full-chunk tokens asked for in lookups.", registry=None)
HIT_TOKENS = Counter("lmcache_hit_tokens", "Tokens found in some tier by lookups.", registry=None)
RETRIEVED_TOKENS = Counter("lmcache_retrieved_tokens", "Tokens copied out by retrieve.", registry=None)
STORED_TOKENS = Counter("lmcache_stored_tokens", "Tokens of new chunks stored.", registry=None)
LOCK_WAITS = Counter("lmcache_lock_waits", "Claims answered 'busy': another owner was computing the chunk.",
                     registry=None)
LOCK_TIMEOUTS = Counter("lmcache_lock_timeouts", "Waits that passed lock_timeout.", registry=None)
LATENCY = Histogram("lmcache_op_seconds", "Latency of engine operations.", ["op"], buckets=_LATENCY_BUCKETS,
                    registry=None)
_METRICS = (LOOKUPS, LOOKUP_TOKENS, HIT_TOKENS, RETRIEVED_TOKENS, STORED_TOKENS, LOCK_WAITS, LOCK_TIMEOUTS, LATENCY)

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
_registered = False


def register(engine, port: int | None) -> None:
    """Include `engine` in scrapes (the first engine of the process adds the metrics to the default
    registry); serve /metrics on `port` (once per process and port)."""
    global _registered
    with _lock:
        if not _registered:
            for metric in (*_METRICS, _collector):
                REGISTRY.register(metric)
            _registered = True
        _engines.add(engine)
        if port is not None and port not in _servers:
            try:
                _servers[port] = start_http_server(port)
            except OSError as e:  # a port in use costs the metrics endpoint, never the engine
                log.warning("lmcache: cannot serve /metrics on port %d: %s; metrics_port is off here", port, e)
                _servers[port] = None


def unregister(engine) -> None:
    """Leave `engine` out of scrapes (closed); the process's counters and /metrics server stay."""
    with _lock:
        _engines.discard(engine)
