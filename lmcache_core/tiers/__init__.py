"""The tiers, one module each: memory (L1 device, L2 CPU arena), disk (L3; its files and its index in
disk_files and disk_index), redis_tier (L4; its connection in redis_client, shared with redis_locks)."""

import os

from ..config import CacheConfig
from .base import Tier


def build_byte_tiers(cfg: CacheConfig) -> list[Tier]:
    """L3 and L4 as configured (either may be absent), fastest first."""
    tiers: list[Tier] = []
    if cfg.local_cache_dir:
        from .disk import DiskTier

        tiers.append(DiskTier(os.path.expanduser(cfg.local_cache_dir), int(cfg.max_local_cache_size),
                              fsync=cfg.disk_fsync, ttl=cfg.disk_ttl))
    if cfg.remote_url is not None:
        from .redis_tier import RedisTier

        tiers.append(RedisTier(cfg.remote_url, ttl=cfg.remote_ttl, timeout=cfg.remote_timeout,
                               max_part_size=int(cfg.remote_max_part_size), batch_size=cfg.batch_size))
    return tiers


def distributed_locks(tiers: list[Tier]):
    """Single-flight locks across instances, on the Redis tier when there is one."""
    from .redis_tier import RedisTier

    for tier in tiers:
        if isinstance(tier, RedisTier):
            from .redis_locks import RedisLocks

            return RedisLocks(tier.client)
    return None
