"""What a worker does once at start-up besides building its engine: say what it runs with, in one line, and
compile every Triton kernel variant the layout needs before the first request does.
"""

import logging

import torch

from kernels import gather_kv, scatter_kv

log = logging.getLogger(__name__)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe_engine(engine) -> str:
    """Tiers (sizes, the L3 directory, the L4 nodes with any password masked), codec, chunk size, metrics."""
    cfg = engine.config
    held = {t.name: t.capacity for t in engine.tiers.memory}
    parts = [f"{n} {_size(held[n])}" if n in held else f"{n} off" for n in ("L1", "L2")]
    if cfg.local_cache_dir:
        parts.append(f"L3 {cfg.local_cache_dir} ({_size(int(cfg.max_local_cache_size))})")
    if cfg.remote_url is not None:
        parts.append(f"L4 {cfg.remote_url}")  # RemoteURL prints its password as ***
    parts.append(f"codec {cfg.effective_codec}, chunk {cfg.chunk_size} tokens, {cfg.write_policy.replace('_', '-')}")
    if cfg.metrics_port is not None:
        parts.append(f"metrics :{cfg.metrics_port}")
    return ", ".join(parts)


def warm_up_kernels(caches, layout, engine) -> None:
    """Run gather and scatter once on the real caches with padding slots only (-1: nothing is read or
    written), so Triton compiles the variants this layout uses now, not inside the first requests.
    Nothing to do on the CPU (the torch path runs there)."""
    first = caches[0] if isinstance(caches, (list, tuple)) else caches
    if not first.is_cuda:
        return
    slots = torch.full((engine.config.chunk_size,), -1, dtype=torch.int64, device=first.device)
    staging = gather_kv(caches, slots, layout, validate=False)
    scatter_kv(staging, caches, slots, layout, validate=False)
    torch.cuda.synchronize(first.device)
    log.info("lmcache: Triton transfer kernels compiled for %s", first.device)
