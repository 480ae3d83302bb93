"""Errors raised by the kernels' launchers (`lmcache_core` re-exports them)."""


class KVLayoutError(ValueError):
    """A KV cache tensor does not match the layout it was described with, or the layout is malformed."""
