"""Damaged and forged chunks in L3 files and L4 values, read through CacheEngine.retrieve.

Over 1,000 generated cases (tests/reliability/forge.py): bit flips, truncations, extensions, another chunk's
valid bytes under this key, random bytes, and forged headers with recomputed checksums (version, lengths,
flags, key, dtype, ndim, codec, shape, section lengths up to 2**64-1, codec parameters; also internally
consistent chunks of the wrong shape or dtype). Relabellings that give a well-formed chunk of the right
shape and dtype cannot be told from an honest chunk without a MAC: they run in test_signed_chunks.py with
cache_secret. Every case is a miss, counted (corrupt, or `incomplete` for
a value Redis-side framing already rejects), and deleted; nothing raises. All five codecs are covered.

Forged lengths must not make the reader allocate: a 2**40 section length, a zstd frame that really expands
to 4 GiB with a header shape to match, a quantized chunk whose KV dim says 2**32 - 1, and a forged
multi-part manifest are read while peak Python allocation (tracemalloc) and peak RSS (VmHWM, reset through
/proc/self/clear_refs) are measured. The direct decoder cases run in a child with a 4 GiB address-space limit,
so a regression fails the test instead of taking the machine's memory.
"""

import collections
import random
import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import redis

from lmcache_core import codec
from lmcache_core.tiers.redis_tier import MANIFEST, MANIFEST_MAGIC, head_name
from tests.reliability import forge
from tests.reliability.common import CS, REPO, engine, kv_for, same_bytes, tokens

CODECS = ("none", "zstd", "int8", "fp8", "int4")
SEQS_PER_CODEC = 3
ROUNDS = 2  # corruption rounds per stored chunk and tier: 15 chunks x 2 rounds x ~35 cases x 2 tiers


@pytest.fixture
def stored(tmp_path, redis_node):
    """Single-chunk sequences stored with every codec into one L3 directory and one Redis; readers for each
    tier alone. Yields (entries, l3_reader, l4_reader, l3_dir, raw redis client); an entry is
    (tokens, kv as decoded, key, valid stored bytes)."""
    l3 = tmp_path / "l3"
    entries = []
    for c, name in enumerate(CODECS):
        w = engine(l2_chunks=1, local_cache_dir=str(l3), remote_url=redis_node.url, codec=name)
        for s in range(SEQS_PER_CODEC):
            toks, kv = tokens(CS, seed=1000 * c + s), kv_for(CS, seed=1000 * c + s)
            w.store(toks, kv)
            w.flush()
            key = w.keys(toks)[0]
            blob = (l3 / key.chunk_hash.hex()[:2] / f"{key.name}.lmc").read_bytes()
            decoded, _ = codec.decode(blob, key.raw)  # lossy codecs: what a correct read returns
            entries.append((toks, decoded, key, blob))
        w.close()
    raw = redis.Redis(host=redis_node.host, port=redis_node.port)
    assert all(raw.get(head_name(k)) == blob for _, _, k, blob in entries), "L3 and L4 hold the same bytes"
    r3 = engine(l2_chunks=1, local_cache_dir=str(l3))
    r4 = engine(l2_chunks=1, remote_url=redis_node.url, remote_timeout=1.0)
    yield entries, r3, r4, l3, raw
    r3.close()
    r4.close()
    raw.close()


def _path(l3, key):
    return l3 / key.chunk_hash.hex()[:2] / f"{key.name}.lmc"


def _served_exact(reader, entries) -> None:
    """The positive control: with valid bytes in place every chunk is served, exactly."""
    for toks, kv, _, _ in entries:
        n, out = reader.retrieve(toks)
        assert n == CS and same_bytes(out, kv), "a valid chunk was not served exactly"
    for tier in reader.tiers.memory:
        tier.clear()


def test_corrupted_chunks_through_the_engine_are_misses(stored):
    entries, r3, r4, l3, raw = stored
    rng = random.Random(1234)
    blobs = [blob for *_, blob in entries]
    tried: collections.Counter = collections.Counter()

    def put_l3(key, data):
        _path(l3, key).write_bytes(data)

    def gone_l3(key):
        return not _path(l3, key).exists()

    def put_l4(key, data):
        raw.set(head_name(key), data)

    def gone_l4(key):
        return not raw.exists(head_name(key))

    for tier_name, reader, put, gone in (("L3", r3, put_l3, gone_l3), ("L4", r4, put_l4, gone_l4)):
        _served_exact(reader, entries)
        stats = reader.tiers.byte_tiers[0].stats
        for _ in range(ROUNDS):
            for toks, _, key, blob in entries:
                others = [b for b in blobs if b is not blob]
                for category, bad in forge.corruptions(rng, blob, others):
                    if bad == blob:
                        continue
                    corrupt, incomplete = stats.corrupt, stats.errors["incomplete"]
                    put(key, bad)
                    got = reader.retrieve(toks)  # any exception fails the test: it would reach the caller
                    assert got == (0, None), f"{tier_name} {category}: a damaged chunk was served"
                    if tier_name == "L4" and len(bad) == MANIFEST.size:
                        # 28 bytes is the tier's multi-part manifest: rejected by the tier's framing, not
                        # decoded; counted as `incomplete`, left in place (the engine cannot tell a torn
                        # multi-part write from a forgery); removed here for the next case
                        assert stats.errors["incomplete"] == incomplete + 1, category
                        raw.delete(head_name(key))
                    else:
                        assert stats.corrupt == corrupt + 1, f"{tier_name} {category}: not counted as corrupt"
                        assert gone(key), f"{tier_name} {category}: the damaged chunk was not deleted"
                    tried[(tier_name, category)] += 1
        for _, _, key, blob in entries:
            put(key, blob)
        _served_exact(reader, entries)  # still serving after all that
    total = sum(tried.values())
    per_tier = {t: sum(n for (tt, _), n in tried.items() if tt == t) for t in ("L3", "L4")}
    kinds = collections.Counter()
    for (_, category), n in tried.items():
        kinds[category.split("-")[0] if not category.startswith("forged") else "forged header"] += n
    print(f"\n[corruption] {total} cases through CacheEngine.retrieve ({per_tier}), all misses, counted and "
          f"deleted: {dict(kinds)}")
    assert total >= 1000 and min(per_tier.values()) >= 500
    assert sum(n for (_, c), n in tried.items() if c.startswith("forged")) >= 400


# -- forged lengths must not allocate --------------------------------------------------------------------


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _forged_length_cases(entries) -> list[tuple[str, object, bytes]]:
    """(what, key, forged bytes) for the zstd and quantized entries."""
    _, _, key, blob = next(e for e in entries if forge.read(e[3], "codec") == 1)  # zstd
    bomb = forge.zstd_bomb_frame(2**32)  # 4 GiB of zeros from 128 KiB
    cases = [
        ("section0 = 2**40", key, forge.reforge(blob, section0=forge.HUGE)),
        ("section1 = 2**64-1", key, forge.reforge(blob, section1=2**64 - 1)),
        ("zstd frame expanding to 4 GiB, header shape to match",
         key, forge.reforge(blob, payload=bomb, ndim=2, dim0=2**15, dim1=2**16, dim2=0, dim3=0, dim4=0)),
    ]
    _, _, key, blob = next(e for e in entries if forge.read(e[3], "codec") == 2)  # int8
    cases.append(("int8 chunk whose KV dim says 2**32-1", key, forge.reforge(blob, dim1=2**32 - 1)))
    cases.append(("int8 group size 2**32-1", key, forge.reforge(blob, param2=2**32 - 1)))
    return cases


def test_forged_lengths_allocate_nothing_proportional(stored):
    entries, r3, r4, l3, raw = stored
    by_key = {key: toks for toks, _, key, _ in entries}
    if not _reset_hwm():
        pytest.skip("/proc/self/clear_refs cannot reset the peak RSS here")
    results = []
    for what, key, bad in _forged_length_cases(entries):
        for tier_name, reader in (("L3", r3), ("L4", r4)):
            if tier_name == "L3":
                _path(l3, key).write_bytes(bad)
            else:
                raw.set(head_name(key), bad)
            _reset_hwm()
            before = _vm_hwm_kib()
            tracemalloc.start()
            got = reader.retrieve(by_key[key])
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            grew = _vm_hwm_kib() - before
            assert got == (0, None), f"{tier_name} {what}: served"
            results.append((tier_name, what, len(bad), peak, grew))
    # a forged multi-part manifest in Redis: 65536 parts of 2**40 bytes in all
    toks, _, key, _ = entries[0]
    raw.set(head_name(key), MANIFEST.pack(MANIFEST_MAGIC, 65536, forge.HUGE, 0))
    _reset_hwm()
    before = _vm_hwm_kib()
    tracemalloc.start()
    got = r4.retrieve(toks)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got == (0, None)
    results.append(("L4", "manifest: 65536 parts, 2**40 bytes", MANIFEST.size, peak, _vm_hwm_kib() - before))
    print("\n[forged lengths] tier, case, stored bytes, peak traced allocation, peak RSS growth:")
    for tier_name, what, size, peak, grew in results:
        print(f"  {tier_name} {what}: {size} B stored, peak alloc {peak / 2**20:.2f} MiB, "
              f"RSS +{grew / 1024:.1f} MiB")
    for tier_name, what, size, peak, grew in results:
        # bounded by the bytes really stored, never by a forged field; the manifest by its part cap
        # (MAX_PARTS = 65536 keys in one MGET, measured 15.6 MiB): a constant, whatever it claims
        bound = 32 * 2**20 if what.startswith("manifest") else 2**20 + 4 * size
        assert peak < bound, f"{tier_name} {what}: {peak} bytes allocated, bound {bound}"
        assert grew < 64 * 1024, f"{tier_name} {what}: RSS grew {grew} KiB"


DECODE_CHILD = textwrap.dedent("""
    import resource, sys, torch
    resource.setrlimit(resource.RLIMIT_AS, (__LIMIT__, __LIMIT__))
    from lmcache_core import codec, serde
    from lmcache_core.errors import CorruptChunkError
    key = bytes(range(32))
    kv = torch.randn(2, 2, 64, 2, 16).to(torch.bfloat16)
    blobs = {c: codec.encode(key, kv, c) for c in ("none", "zstd", "int8", "fp8", "int4")}
    from tests.reliability import forge
    cases = [
        ("none", dict(section0=forge.HUGE)),
        ("none", dict(dim0=2**31, dim1=2**31, dim2=2**31, dim3=2**31, dim4=2**31)),
        # 73728 * 307 * 2857 * 6529 * 43691 = 2**64 + 8192: in int64 arithmetic the real element count
        ("none", dict(dim0=73728, dim1=307, dim2=2857, dim3=6529, dim4=43691)),
        ("zstd", dict(dim0=73728, dim1=307, dim2=2857, dim3=6529, dim4=43691)),
        ("zstd", dict(dim0=2**32 - 1, dim1=2**32 - 1)),
        ("int8", dict(dim1=2**32 - 1)),  # the scale layout loops over the KV dim
        ("fp8", dict(dim1=2**32 - 1)),
        ("int4", dict(dim0=2**32 - 1, dim1=2, dim2=2**32 - 1)),
        ("int8", dict(param1=2**31)),  # token tile: pads the tokens to it
        ("fp8", dict(param2=2**32 - 1)),  # group size: pads D to it
        ("int4", dict(param2=2**32 - 2)),
    ]
    for name, fields in cases:
        try:
            codec.decode(forge.reforge(blobs[name], **fields), key)
        except CorruptChunkError:
            pass
        else:
            sys.exit(f"{name} {fields}: decoded")
    bomb = forge.zstd_bomb_frame(2**32)
    forged = forge.reforge(blobs["zstd"], payload=bomb, ndim=2, dim0=2**15, dim1=2**16, dim2=0, dim3=0, dim4=0)
    try:
        codec.decode(forged, key, expect=((2, 2, 64, 2, 16), torch.bfloat16))
    except CorruptChunkError:
        pass
    else:
        sys.exit("the 4 GiB zstd bomb was decoded despite expect=")
    print("all rejected")
""")


def test_decoder_rejects_forged_sizes_under_a_memory_limit():
    limit = 6 * 2**30  # address space: torch alone maps ~1 GiB; a 4 GiB output or a 2**32-entry loop won't fit
    out = subprocess.run([sys.executable, "-c", DECODE_CHILD.replace("__LIMIT__", str(limit))], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "all rejected" in out.stdout, (out.stdout + out.stderr)[-3000:]
