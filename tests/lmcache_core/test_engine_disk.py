"""CacheEngine with a real L3 directory: write-through, promotion, restart, corruption, codecs, processes."""

import os
import subprocess
import sys

import pytest
import torch

from lmcache_core import serde
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from tests.helpers import assert_bytes_equal, assert_close
from tests.lmcache_core.test_engine_memory import CHUNK_BYTES, CS, SPEC, kv_for, tokens

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def disk_engine(path, l2_chunks=2, **cfg):
    cfg.setdefault("chunk_size", CS)
    cfg.setdefault("prefetch_enabled", False)
    config = CacheConfig(max_local_cpu_size=f"{l2_chunks * CHUNK_BYTES}B", local_cache_dir=str(path),
                         max_local_cache_size="10MB", **cfg)
    return CacheEngine(config, spec=SPEC, device="cpu")


def chunk_files(path):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.endswith(".lmc"))


def stored_codecs(path):
    codecs = set()
    for name in chunk_files(path):
        with open(name, "rb") as f:
            codecs.add(serde.unpack_header(f.read()).codec)
    return codecs


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_chunks_evicted_from_memory_come_back_exact_from_disk(tmp_path, codec):
    e = disk_engine(tmp_path, codec=codec, compression_min_ratio=1.0)  # random KV: keep zstd anyway
    toks, kv = tokens(160), kv_for(160)
    assert e.store(toks, kv) == 160
    e.flush()
    assert len(chunk_files(tmp_path)) == 10
    assert stored_codecs(tmp_path) == {codec}
    assert e.stats()["L2"]["entries"] == 2  # the rest live on disk only
    n, out = e.retrieve(toks)
    assert n == 160
    assert_bytes_equal(out, kv, "from L3")
    assert e.stats()["L3"]["hits"] >= 8


def test_chunks_that_barely_compress_are_stored_raw(tmp_path):
    """Default compression_min_ratio 1.25: random bf16 KV (zstd ~1.1x) goes to disk raw, zeros compressed."""
    e = disk_engine(tmp_path)
    e.store(tokens(32), kv_for(32))
    e.flush()
    assert stored_codecs(tmp_path) == {"none"}
    e.store(tokens(32, seed=5), torch.zeros(SPEC.chunk_shape(32), dtype=torch.bfloat16))
    e.flush()
    assert stored_codecs(tmp_path) == {"none", "zstd"}
    e.tiers.memory[0].clear()
    for toks, kv in ((tokens(32), kv_for(32)), (tokens(32, seed=5), torch.zeros_like(kv_for(32)))):
        n, out = e.retrieve(toks)
        assert n == 32
        assert_bytes_equal(out, kv, "from L3")


def test_lossy_codec_through_disk_stays_within_int8_error(tmp_path):
    e = disk_engine(tmp_path, l2_chunks=1, codec="int8")
    toks = tokens(64)
    kv = torch.randn(SPEC.chunk_shape(64)).to(torch.bfloat16)
    e.store(toks, kv)
    e.flush()
    e.tiers.memory[0].clear()
    n, out = e.retrieve(toks)
    assert n == 64
    # symmetric int8: |x - x^| <= scale / 2 with scale = amax / 127 per group; amax <= max|x|
    bound = kv.float().abs().max().item() / 127 / 2 * 1.02 + 1e-2
    assert_close(out, kv, atol=bound, rtol=0.0, what="int8 round trip")


def test_restart_reindexes_the_directory(tmp_path):
    toks, kv = tokens(64), kv_for(64)
    with disk_engine(tmp_path) as e:
        e.store(toks, kv)
    fresh = disk_engine(tmp_path)
    assert fresh.lookup(toks) == 64
    n, out = fresh.retrieve(toks)
    assert n == 64
    assert_bytes_equal(out, kv, "after restart")
    fresh.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap"])
def test_corrupt_files_are_misses_deleted_and_counted(tmp_path, damage):
    toks, kv = tokens(64), kv_for(64)
    with disk_engine(tmp_path) as e:
        e.store(toks, kv)
    files = chunk_files(tmp_path)
    victim = files[1]  # the chunk of tokens 16..31 or another: whichever sorts second
    data = bytearray(open(victim, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        data = data[: len(data) - 7]
    else:  # another chunk's (valid) bytes under this chunk's name
        data = bytearray(open(files[0], "rb").read())
    open(victim, "wb").write(bytes(data))

    fresh = disk_engine(tmp_path, l2_chunks=8)
    n, out = fresh.retrieve(toks)
    assert n < 64  # the damaged chunk and everything after it are recomputed
    if n:
        assert_bytes_equal(out, kv[:, :, :n], "chunks before the damaged one")
    assert fresh.stats()["L3"]["corrupt"] == 1
    assert not os.path.exists(victim)
    fresh.close()


def test_prefetch_moves_disk_chunks_into_memory_after_lookup(tmp_path):
    toks, kv = tokens(64), kv_for(64)
    with disk_engine(tmp_path) as e:
        e.store(toks, kv)
    fresh = disk_engine(tmp_path, l2_chunks=8, prefetch_enabled=True)
    assert fresh.lookup(toks) == 64
    fresh.flush()
    assert fresh.stats()["L2"]["entries"] == 4
    l3_hits = fresh.stats()["L3"]["hits"]
    n, out = fresh.retrieve(toks)
    assert n == 64 and fresh.stats()["L3"]["hits"] == l3_hits  # served from memory
    assert_bytes_equal(out, kv, "prefetched")
    fresh.close()


CHILD = """
import sys, torch
sys.path.insert(0, {repo!r})
from tests.lmcache_core.test_engine_disk import disk_engine
from tests.lmcache_core.test_engine_memory import kv_for, tokens
e = disk_engine({path!r})
toks = tokens(64, seed=5)
if sys.argv[1] == "store":
    e.store(toks, kv_for(64, seed=5)); e.close(); print("stored")
else:
    n, out = e.retrieve(toks)
    ok = n == 64 and torch.equal(out.view(torch.int16), kv_for(64, seed=5).view(torch.int16))
    print("match" if ok else f"mismatch n={{n}}")
"""


def test_two_processes_share_one_directory(tmp_path):
    here = disk_engine(tmp_path)  # started before the other process writes: must still see its chunks
    assert here.lookup(tokens(64, seed=5)) == 0
    script = CHILD.format(repo=REPO, path=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script, "store"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "stored", out.stderr[-2000:]
    assert here.lookup(tokens(64, seed=5)) == 64
    out = subprocess.run([sys.executable, "-c", script, "load"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "match", out.stderr[-2000:]
    here.close()


def test_pin_brings_disk_chunks_into_memory(tmp_path):
    toks, kv = tokens(32, seed=8), kv_for(32, seed=8)
    with disk_engine(tmp_path) as e:
        e.store(toks, kv)
    fresh = disk_engine(tmp_path, l2_chunks=4, hot_hit_threshold=0)
    assert fresh.stats()["L2"]["entries"] == 0
    assert fresh.pin(toks) == 32
    for s in range(6):  # churn L2: the pinned chunks stay
        fresh.store(tokens(16, seed=100 + s), kv_for(16, seed=100 + s))
    l3_hits = fresh.stats()["L3"]["hits"]
    n, out = fresh.retrieve(toks)
    assert n == 32 and fresh.stats()["L3"]["hits"] == l3_hits
    assert_bytes_equal(out, kv, "pinned")
    fresh.close()
