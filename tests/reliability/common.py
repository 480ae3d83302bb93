"""Shared pieces of the reliability suite: one small KV spec, deterministic KV per sequence, engine builders,
and helpers that list what a cache wrote (L3 files, Redis keys) and time calls.

Token ids are distinctive on purpose (10-digit decimals, above 3e9), so a test can look for them in file
names, Redis keys, stored values and logs without a false match.
"""

import os
import random
import time
from pathlib import Path

import torch

from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVSpec

CS = 16  # tokens per chunk
SPEC = KVSpec("reliability-model@r1", "bfloat16", "flash_attn", num_layers=2, num_kv=2, num_heads=2,
              head_dim=16, chunk_size=CS)
CHUNK_BYTES = 2 * 2 * CS * 2 * 16 * 2  # L * KV * N * H * D * 2 bytes = 4096
TOKEN_BASE = 3_141_000_000  # every token id is TOKEN_BASE + something < 2**24: distinctive, < 2**32
REPO = Path(__file__).resolve().parents[2]


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(f"tokens-{seed}")
    return [TOKEN_BASE + rng.randrange(1 << 24) for _ in range(n)]


def kv_for(n: int, seed: int, spec: KVSpec = SPEC) -> torch.Tensor:
    """Deterministic staging KV [L, 2, n, H, D] for sequence `seed` (every bit pattern but NaNs is fine)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(spec.chunk_shape(n), generator=g).to(getattr(torch, spec.dtype))


def same_bytes(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def engine(*, l1_chunks: int = 0, l2_chunks: int = 2, spec: KVSpec = SPEC, byte_tiers=None,
           chunk_bytes: int = CHUNK_BYTES, **cfg) -> CacheEngine:
    """A CPU engine with explicit L1/L2 sizes in chunks; other CacheConfig keys pass through."""
    cfg.setdefault("chunk_size", spec.chunk_size)
    cfg.setdefault("prefetch_enabled", False)
    config = CacheConfig(max_device_cache_size=f"{l1_chunks * chunk_bytes}B" if l1_chunks else None,
                         max_local_cpu_size=f"{l2_chunks * chunk_bytes}B", **cfg)
    return CacheEngine(config, spec=spec, device="cpu", byte_tiers=byte_tiers)


def chunk_files(root) -> list[Path]:
    return sorted(Path(root).glob("??/*.lmc"))


def temp_files(root) -> list[Path]:
    return sorted(Path(root).glob("??/.*.tmp"))


def all_names_under(root) -> list[str]:
    """Every file and directory name below `root` (what an `ls -R` of the cache directory shows)."""
    out = []
    for d, dirs, files in os.walk(root):
        out += dirs + files
    return out


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - t0


def cluster_seeds(cluster) -> str:
    return ",".join(f"{n.host}:{n.port}" for n in cluster.nodes)
