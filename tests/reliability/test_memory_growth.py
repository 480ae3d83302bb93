"""A long mixed run (12,000 operations after a 3,000-operation warm-up) against small caps on L1, L2, L3 and a
real Redis: process RSS must not grow beyond a stated margin, although the run pushes hundreds of times the
caps through the cache and half the operations use sequences never seen before (so a per-key leak in any
index, LRU, lock table or prefetch map would grow with them). The bookkeeping structures are checked too.
"""

import ctypes
import gc
import os
import random

import torch

from lmcache_core.tiers.disk_index import LRU_SLACK
from tests.reliability.common import CHUNK_BYTES, CS, engine, kv_for, same_bytes, tokens

WARMUP_OPS, OPS = 3_000, 12_000
L1_CHUNKS, L2_CHUNKS, L3_FILES = 6, 8, 40
# What the run may add to RSS after the warm-up: allocator and interpreter noise, measured at < 2 MiB on a
# 2-core CI box; the cached KV itself (L1 + L2 = 56 KiB in memory) is allocated during the warm-up.
MARGIN = 8 * 2**20


def _rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so RSS reflects live memory
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_long_run_rss_stays_flat(tmp_path, redis_node):
    e = engine(l1_chunks=L1_CHUNKS, l2_chunks=L2_CHUNKS, local_cache_dir=str(tmp_path / "l3"),
               max_local_cache_size=f"{L3_FILES * (CHUNK_BYTES + 128)}B", codec="none",
               remote_url=redis_node.url, remote_ttl=60, hot_cache_ttl=0.05, prefetch_enabled=True)
    rng = random.Random(11)
    hot = [(tokens(2 * CS, seed=900 + s), kv_for(2 * CS, seed=900 + s)) for s in range(32)]
    fresh = [0]
    moved = [0]

    def one_op():
        if rng.random() < 0.5:  # a sequence never seen before
            fresh[0] += 1
            toks = tokens(2 * CS, seed=10**6 + fresh[0])
            kv = (hot[fresh[0] % len(hot)][1].view(torch.int16) ^ (fresh[0] & 0x7FFF)).view(torch.bfloat16)
        else:
            toks, kv = hot[rng.randrange(len(hot))]
        r = rng.random()
        if r < 0.35:
            e.store(toks, kv, pin=rng.random() < 0.05)
            moved[0] += kv.nbytes
        elif r < 0.75:
            n, out = e.retrieve(toks)
            assert n == 0 or same_bytes(out, kv[:, :, :n])
        elif r < 0.85:
            e.lookup(toks)
        elif r < 0.90:
            e.pin(toks)
            e.unpin(toks)
        elif r < 0.97:
            if e.claim(toks, owner="req").state == "compute":
                e.release(toks, owner="req")
        else:
            e.lookup_batch([toks, hot[0][0]])

    for _ in range(WARMUP_OPS):
        one_op()
    e.flush()
    before = _rss()
    for _ in range(OPS):
        one_op()
    e.flush()
    after = _rss()
    stats = e.stats()
    caps = L1_CHUNKS * CHUNK_BYTES + L2_CHUNKS * CHUNK_BYTES
    print(f"\n[memory] {OPS} operations after {WARMUP_OPS} of warm-up, {fresh[0]} new sequences, "
          f"{moved[0] / 2**20:.1f} MiB stored ({moved[0] / caps:.0f}x the memory caps); RSS "
          f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({(after - before) / 2**20:+.2f} MiB, margin "
          f"{MARGIN / 2**20:.0f} MiB)")
    assert after - before < MARGIN, f"RSS grew {(after - before) / 2**20:.1f} MiB over {OPS} operations"
    # bookkeeping bounded by the caps, not by the operations or keys seen
    for tier in e.tiers.memory:
        sizes = tier.sizes()
        assert sizes["entries"] == sizes["policy_keys"] == stats[tier.name]["entries"], sizes
        assert sizes["policy_hit_counts"] <= sizes["entries"] and sizes["policy_pins"] == 0, sizes
        assert sizes["positions"] <= sizes["entries"] and sizes["readers"] == sizes["retired"] == 0, sizes
    assert e.tiers.pinned_keys() == 0, "every pin was released"
    disk = e.tiers.byte_tiers[0]
    disk.rescan()
    disk.rescan()  # two idle rescans forget every removal recorded before them
    sizes = disk.index.sizes()
    assert sizes["entries"] == stats["L3"]["entries"] <= L3_FILES and sizes["lru"] <= 2 * L3_FILES + LRU_SLACK
    assert (sizes["writing"], sizes["cancel"], sizes["removing"], sizes["removed"]) == (0, 0, 0, 0), sizes
    assert e.tiers.in_flight() == 0
    assert e.locks_held() == 0, "every claim was released or stored"
    e.close()
