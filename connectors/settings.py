"""The connector's settings: the cache configuration (`CacheConfig.load`: file, LMCACHE_* variables) with
vLLM's `kv_connector_extra_config` over it, and the few keys the connector reads itself."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_core import CacheConfig, ConfigError

# kv_connector_extra_config keys the connector reads itself; every other key is a CacheConfig override.
CONNECTOR_KEYS = ("kv_load_failure_policy", "segment_rerotate")
FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class ConnectorSettings:
    cache: CacheConfig
    # A failed or unverifiable load: "recompute" (vLLM recomputes those blocks; default, a cache fault is a
    # miss) or "fail" (vLLM fails the request, its own default for P/D transfers).
    kv_load_failure_policy: str = "recompute"
    # Segment reuse re-rotates a loaded segment's K to its new positions; False skips that (a diagnostic,
    # to measure what re-rotation is worth: bench.ttft's ours-segment-norotate).
    segment_rerotate: bool = True


def load_settings(extra_config: Mapping[str, Any] | None) -> ConnectorSettings:
    """CacheConfig.load(overrides=extra config minus the connector's own keys), plus those keys."""
    extra = dict(extra_config or {})
    own = {k: extra.pop(k) for k in CONNECTOR_KEYS if k in extra}
    policy = own.get("kv_load_failure_policy", "recompute")
    if policy not in FAILURE_POLICIES:
        raise ConfigError(f"kv_connector_extra_config: kv_load_failure_policy: expected one of "
                          f"{FAILURE_POLICIES}, got {policy!r}")
    rerotate = own.get("segment_rerotate", True)
    if not isinstance(rerotate, bool):
        raise ConfigError(f"kv_connector_extra_config: segment_rerotate: expected true or false, got {rerotate!r}")
    return ConnectorSettings(CacheConfig.load(overrides=extra), policy, rerotate)
