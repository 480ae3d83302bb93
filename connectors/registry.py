"""One CacheEngine per (process, cache settings, KV spec), shared by the connector halves that live there.

With TP=1 vLLM runs the scheduler and its one worker in one process (the EngineCore, or the caller's
process with VLLM_ENABLE_V1_MULTIPROCESSING=0): both halves then use the same engine, so the scheduler's
lookups see the chunks the worker keeps in L1/L2. A later `LLM` in the same process with the same settings
gets the same engine too (its cache survives the first instance). Where the worker lives in another process
(TP > 1), the scheduler's engine has no chunks in memory and answers from L3/L4 only.

`byte_tiers_from_config` builds L3 (DiskTier) and L4 (RedisTier + RedisLocks) from a CacheConfig; it belongs
in lmcache_core (a CacheEngine.from_config), and lives here until it moves there.
"""

import atexit
import logging
import threading

import torch

from lmcache_core import CacheConfig, CacheEngine, KVSpec

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[tuple, CacheEngine] = {}


def byte_tiers_from_config(config: CacheConfig) -> tuple[list, object | None]:
    """(byte tiers fastest first, distributed single-flight locks or None) as the config asks for."""
    tiers, locks = [], None
    if config.local_cache_dir:
        from lmcache_core.tiers.disk import DiskTier

        tiers.append(DiskTier(config.local_cache_dir, int(config.max_local_cache_size), fsync=config.disk_fsync,
                              ttl=config.disk_ttl))
    if config.remote_url is not None:
        from lmcache_core.tiers.redis_locks import RedisLocks
        from lmcache_core.tiers.redis_tier import RedisTier

        remote = RedisTier.from_config(config)
        tiers.append(remote)
        locks = RedisLocks(remote)
    return tiers, locks


def shared_engine(config: CacheConfig, spec: KVSpec, device: torch.device | None = None) -> CacheEngine:
    """The process's engine for (config, spec); created on first use.

    device None (the scheduler half) takes whichever engine exists, else makes one on the CPU that only
    answers lookups. A worker passes its device and gets an engine on it.
    """
    with _lock:
        if device is None:
            for (cfg, sp, _dev), engine in _engines.items():
                if cfg == config and sp == spec:
                    return engine
            device = torch.device("cpu")
        key = (config, spec, torch.device(device).type)
        engine = _engines.get(key)
        if engine is None:
            tiers, locks = byte_tiers_from_config(config)
            engine = CacheEngine(config, spec=spec, device=device, byte_tiers=tiers, distributed_locks=locks)
            _engines[key] = engine
            log.info("lmcache: new cache engine for %s on %s (%d byte tiers)", spec.model, device, len(tiers))
        return engine


def engines() -> list[CacheEngine]:
    with _lock:
        return list(_engines.values())


def flush_all() -> None:
    """Wait for every engine's background writes (tests; process exit)."""
    for engine in engines():
        engine.flush()


def close_all() -> None:
    """Flush and close every engine of this process and forget them (tests start cold after this)."""
    with _lock:
        items = list(_engines.values())
        _engines.clear()
    for engine in items:
        try:
            engine.close()
        except Exception as e:  # closing is best effort: a dead Redis must not fail a shutdown
            log.warning("lmcache: closing an engine failed: %r", e)


atexit.register(flush_all)
