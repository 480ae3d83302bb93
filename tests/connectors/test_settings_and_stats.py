"""The connector's settings (kv_connector_extra_config over LMCACHE_* over the YAML file) and statistics
(what vLLM ships to its front end, and the Prometheus counters built from them)."""

import pytest
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from connectors.settings import load_settings
from connectors.vllm_config import model_fingerprint
from connectors.stats import LMCacheCorePromMetrics, LMCacheCoreStats
from connectors.vllm_v1 import LMCacheCoreConnector
from lmcache_core import ConfigError


def test_extra_config_overrides_environment_and_file(tmp_path, monkeypatch):
    path = tmp_path / "lmcache.yaml"
    path.write_text("chunk_size: 512\nlock_timeout: 3\ncache_salt: from-file\n")
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(path))
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "384")
    monkeypatch.setenv("LMCACHE_LOCAL_DISK_SIZE", "2")
    settings = load_settings({"chunk_size": 128, "kv_load_failure_policy": "fail"})
    assert settings.cache.chunk_size == 128  # extra config wins
    assert settings.cache.lock_timeout == 3.0 and settings.cache.cache_salt == "from-file"  # from the file
    assert settings.cache.max_local_cache_size == 2 * 10**9  # the env alias
    assert settings.kv_load_failure_policy == "fail"
    assert load_settings(None).kv_load_failure_policy == "recompute"


@pytest.mark.parametrize("extra,match", [
    ({"kv_load_failure_policy": "ignore"}, "kv_load_failure_policy"),
    ({"chunk_sise": 128}, "chunk_size"),
    ({"chunk_size": 100}, "multiple of 16"),
])
def test_bad_extra_config_fails_at_start(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(extra)


def test_model_fingerprint_pins_weights():
    class ModelConfig:
        model, revision, dtype, quantization = "org/m", "abc123", "torch.float32", None

    a = model_fingerprint(ModelConfig)
    ModelConfig.revision = "def456"
    assert model_fingerprint(ModelConfig) != a and "org/m" in a


def test_stats_aggregate_reduce_and_take():
    worker, scheduler = LMCacheCoreStats(), LMCacheCoreStats()
    worker.add("loaded_tokens", 256)
    scheduler.add("requests", 2)
    scheduler.add("lookup_tokens", 512)
    scheduler.add("hit_tokens", 384)
    merged = LMCacheCoreConnector.build_kv_connector_stats(worker.take().data).aggregate(scheduler.take())
    assert merged.reduce() == {"requests": 2, "lookup_tokens": 512, "hit_tokens": 384, "loaded_tokens": 256,
                               "load_failed_tokens": 0, "stored_tokens": 0, "segment_loaded_tokens": 0,
                               "segment_stored_tokens": 0, "lock_timeouts": 0, "hit_rate": 0.75}
    assert worker.take() is None and worker.totals == {"loaded_tokens": 256}  # drained, totals kept


def test_prom_metrics_count_per_engine():
    class VllmConfig:
        kv_transfer_config = None

    metrics = LMCacheCorePromMetrics(VllmConfig, {Counter: Counter, Gauge: Gauge, Histogram: Histogram},
                                     ["engine"], {0: ["e0"]})
    try:
        metrics.observe({"requests": 3, "lookup_tokens": 1024, "hit_tokens": 256, "loaded_tokens": 256})
        metrics.observe({"requests": 1, "lookup_tokens": 0, "hit_tokens": 0})
        value = lambda name: REGISTRY.get_sample_value(name, {"engine": "e0"})  # noqa: E731
        assert value("vllm:lmcache_requests_total") == 4
        assert value("vllm:lmcache_loaded_tokens_total") == 256
        assert value("vllm:lmcache_hit_rate") == 0.25
    finally:
        for collector in {c for c in REGISTRY._collector_to_names if
                          any(n.startswith("vllm:lmcache_") for n in REGISTRY._collector_to_names[c])}:
            REGISTRY.unregister(collector)
