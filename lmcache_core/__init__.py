"""The tiered KV cache engine: device LRU -> pinned CPU arena -> local disk -> Redis (Cluster)."""

from kernels.errors import KVLayoutError

from .config import CacheConfig
from .engine import CacheEngine, Claim
from .errors import ConfigError, CorruptChunkError, LMCacheError, LockTimeoutError, TierUnavailableError
from .keys import ChunkKey, KVSpec

__all__ = [
    "CacheConfig", "CacheEngine", "ChunkKey", "Claim", "ConfigError", "CorruptChunkError", "KVLayoutError",
    "KVSpec", "LMCacheError", "LockTimeoutError", "TierUnavailableError",
]
