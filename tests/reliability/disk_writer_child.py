"""A process that stores sequences through CacheEngine into an L3 directory until it is killed.

    python -m tests.reliability.disk_writer_child DIR START FSYNC

Sequence i (from START on) is 4 chunks of 128 KiB (codec none, so each file is ~128 KiB and a kill often
lands inside a write; FSYNC is the disk_fsync policy). After `store` and `flush` return it prints `i`: from
then on the chunks are promised to be on disk. The parent (test_disk_crash.py) kills it with SIGKILL.
"""

import sys

import torch

from lmcache_core.keys import KVSpec
from tests.reliability.common import engine, tokens

BIG = KVSpec("reliability-big@r1", "bfloat16", "flash_attn", num_layers=2, num_kv=2, num_heads=4, head_dim=64,
             chunk_size=64)
BIG_CHUNK_BYTES = 2 * 2 * 64 * 4 * 64 * 2  # 131072
SEQ_TOKENS = 4 * 64
CAPACITY = "1GB"


def big_tokens(i: int) -> list[int]:
    return tokens(SEQ_TOKENS, seed=50_000 + i)


_BASE: list[torch.Tensor] = []


def big_kv(i: int) -> torch.Tensor:
    """Sequence i's KV: one random tensor with i folded into every element's bits (cheap, and distinct)."""
    if not _BASE:
        g = torch.Generator().manual_seed(77)
        _BASE.append(torch.randn(BIG.chunk_shape(SEQ_TOKENS), generator=g).to(torch.bfloat16))
    return (_BASE[0].view(torch.int16) ^ (i & 0x7FFF)).view(torch.bfloat16)


def writer_engine(path: str, **kw):
    return engine(spec=BIG, l2_chunks=1, chunk_bytes=BIG_CHUNK_BYTES, local_cache_dir=path,
                  max_local_cache_size=CAPACITY, codec="none", **kw)


def main(path: str, start: int, fsync: str) -> None:
    e = writer_engine(path, disk_fsync=fsync)
    i = start
    while True:
        e.store(big_tokens(i), big_kv(i))
        e.flush()
        print(i, flush=True)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
