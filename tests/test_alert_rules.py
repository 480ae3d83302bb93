"""deploy/prometheus/lmcache-alerts.yml: valid for Prometheus (`promtool check rules`), its alerts fire and stay
quiet as its unit tests say (`promtool test rules`), and every metric it names is one the connector exports on
vLLM's /metrics (so a renamed metric breaks this test, not the alert in production).

promtool comes with Debian's `prometheus` package: `make test` runs scripts/ensure_promtool.sh first.
"""

import os
import re
import shutil
import subprocess

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RULES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "prometheus")
RULES = os.path.join(RULES_DIR, "lmcache-alerts.yml")


def _promtool(*args: str) -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run scripts/ensure_promtool.sh (make test does)"
    done = subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_rules_are_valid():
    assert "SUCCESS: 4 rules found" in _promtool("check", "rules", RULES)


def test_alerts_fire_as_their_unit_tests_say():
    assert "SUCCESS" in _promtool("test", "rules", "lmcache-alerts.test.yml")


def test_every_metric_the_rules_name_is_exported():
    """Feed the connector's Prometheus metrics one step of every figure, as vLLM would, in a registry of
    their own, and look for each name the rules use."""
    from connectors.stats import LMCacheCorePromMetrics

    registry = CollectorRegistry()

    def bound(cls):
        return lambda *a, **kw: cls(*a, registry=registry, **{k: v for k, v in kw.items()
                                                                 if k != "multiprocess_mode"})

    class VllmConfig:
        kv_transfer_config = None

    metrics = LMCacheCorePromMetrics(VllmConfig, {Counter: bound(Counter), Gauge: bound(Gauge),
                                                  Histogram: bound(Histogram)}, ["engine"], {0: ["0"]})
    tier = {"used_bytes": 1, "capacity_bytes": 2, "entries": 1, "pinned_bytes": 0, "corrupt": 1,
            "errors": {"timeout": 2}, "fs_size_bytes": 10, "fs_avail_bytes": 5}
    metrics.observe({"requests": 1, "lookup_tokens": 256, "hit_tokens": 256, "lookup_seconds": [0.001],
                     "tiers": {"0/0": {"L3": tier}}})
    exported = set(re.findall(r"^(vllm:lmcache_\w+?)(?:\{| )", generate_latest(registry).decode(), re.M))
    named = set(re.findall(r"vllm:lmcache_\w+", open(RULES).read()))
    assert named and named <= exported, f"named by the rules but not exported: {sorted(named - exported)}"
