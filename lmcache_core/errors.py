"""The exceptions lmcache_core raises on purpose.

Catch `LMCacheError` for all of them. The two that describe bad input also derive from `ValueError`,
so code that validates arguments the usual way keeps working.
"""


class LMCacheError(Exception):
    """Base class of every error raised on purpose by this library."""


class ConfigError(LMCacheError, ValueError):
    """A configuration value (file, environment, overrides or URL) is unknown, mistyped or out of range."""


class TierUnavailableError(LMCacheError):
    """A cache tier cannot be reached or used right now (server down, disk gone); callers treat it as a miss."""


class CorruptChunkError(LMCacheError):
    """A stored chunk's header or checksum does not verify; it is a miss and gets deleted."""



class LockTimeoutError(LMCacheError, TimeoutError):
    """Another instance kept computing the same chunks past `lock_timeout` and `fallback_on_timeout` is off."""
