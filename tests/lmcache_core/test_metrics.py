"""Prometheus metrics: served on metrics_port, hit rate and tier counters reflect what happened."""

import re
import socket
import subprocess

from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from tests.lmcache_core.test_engine_memory import SPEC, kv_for, tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def test_metrics_endpoint_reports_hit_rate_and_tier_counters():
    port = _free_port()
    e = CacheEngine(CacheConfig(chunk_size=16, max_local_cpu_size="1MB", metrics_port=port), spec=SPEC,
                    device="cpu")
    before = subprocess.run(["curl", "-s", f"localhost:{port}/metrics"], capture_output=True, text=True,
                            timeout=10).stdout
    toks = tokens(64)
    e.lookup(toks)  # miss: 64 tokens asked, 0 hit
    e.store(toks, kv_for(64))
    e.lookup(toks)  # hit: 64 of 64
    e.retrieve(toks)
    text = subprocess.run(["curl", "-s", f"localhost:{port}/metrics"], capture_output=True, text=True,
                          timeout=10).stdout
    grep = [line for line in text.splitlines() if line.startswith("lmcache_hit_rate")]
    assert grep, "curl localhost:PORT/metrics | grep lmcache_hit_rate finds nothing"
    asked = _metric(text, "lmcache_lookup_tokens_total") - _metric(before, "lmcache_lookup_tokens_total")
    hit = _metric(text, "lmcache_hit_tokens_total") - _metric(before, "lmcache_hit_tokens_total")
    assert (asked, hit) == (128, 64)
    assert 0 < _metric(text, "lmcache_hit_rate") <= 1
    assert _metric(text, "lmcache_tier_entries", '{tier="L2"}') >= 4
    assert _metric(text, "lmcache_tier_bytes_written_total", '{tier="L2"}') >= 4 * 2048
    assert _metric(text, "lmcache_op_seconds_count", '{op="retrieve"}') >= 1
