"""Segment chunks: stored under explicit keys with the position they were computed at; that position comes
back with the exact bytes from every tier (memory entries, demotion, disk headers, prefetch, promotion)."""

import pytest

from kernels import chunk_hashes
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from tests.helpers import assert_bytes_equal
from tests.lmcache_core.test_engine_memory import CHUNK_BYTES, CS, SPEC, kv_for, make_engine, tokens


def segment_items(engine, n_chunks, first_position=1000, seed=0):
    toks = tokens(n_chunks * CS, seed=seed)
    keys = engine.keys_of(chunk_hashes(toks, chunk_size=CS, mode="segment", salt=engine.salt()))
    kv = kv_for(n_chunks * CS, seed=seed)
    return [(k, kv[:, :, i * CS:(i + 1) * CS], first_position + 37 * i) for i, k in enumerate(keys)]


def read_all(engine, keys):
    got = []
    n = engine.retrieve_positioned(keys, lambda i, kv, pos: got.append((i, kv.clone(), pos)))
    return n, got


def check_round_trip(engine, items):
    n, got = read_all(engine, [k for k, _, _ in items])
    assert n == len(items)
    for (i, kv, pos), (_, want, want_pos) in zip(got, items):
        assert pos == want_pos, f"chunk {i}: position {pos}, stored at {want_pos}"
        assert_bytes_equal(kv, want, f"chunk {i}")


@pytest.mark.parametrize("l1,l2", [(8, 0), (0, 8), (8, 8)], ids=["L1", "L2", "L1+L2"])
def test_positions_round_trip_in_memory(l1, l2):
    e = make_engine(l1, l2)
    items = segment_items(e, 4)
    assert e.contains([k for k, _, _ in items]) == [False] * 4
    assert e.store_positioned(items) == 4
    assert e.contains([k for k, _, _ in items]) == [True] * 4
    check_round_trip(e, items)
    check_round_trip(e, items)  # after promotion L2 -> L1 too


def test_write_back_demotion_keeps_positions():
    e = make_engine(2, 8, write_policy="write_back")
    items = segment_items(e, 6)  # L1 holds 2: four are demoted to L2 on the way
    e.store_positioned(items)
    check_round_trip(e, items)


def test_disk_header_carries_the_position_and_prefetch_keeps_it(tmp_path):
    cfg = dict(local_cache_dir=str(tmp_path), max_local_cache_size="1GB", chunk_size=CS)
    first = CacheEngine(CacheConfig(max_local_cpu_size=f"{8 * CHUNK_BYTES}B", **cfg), spec=SPEC, device="cpu")
    items = segment_items(first, 3)
    first.store_positioned(items)
    first.close()
    for prefetch in (False, True):  # a restarted engine: only the disk holds them
        second = CacheEngine(CacheConfig(max_local_cpu_size=f"{8 * CHUNK_BYTES}B", prefetch_enabled=prefetch,
                                         **cfg), spec=SPEC, device="cpu")
        keys = [k for k, _, _ in items]
        if prefetch:
            second.tiers.prefetch(keys, second.tiers.locate(keys))
            second.flush()
            assert [t for t in second.tiers.locate(keys)] == [0] * 3, "prefetch did not bring them into L2"
        check_round_trip(second, items)
        second.close()


def test_prefix_chunks_read_with_position_report_none():
    e = make_engine()
    toks = tokens(2 * CS)
    e.store(toks, kv_for(2 * CS))
    n, got = read_all(e, e.keys(toks))
    assert n == 2 and [pos for _, _, pos in got] == [None, None]


def test_retrieve_positioned_stops_at_the_first_missing_chunk():
    e = make_engine()
    items = segment_items(e, 3)
    e.store_positioned([items[0], items[2]])
    n, got = read_all(e, [k for k, _, _ in items])
    assert n == 1 and len(got) == 1


@pytest.mark.parametrize("bad,match", [
    (lambda kv: (kv[:, :, :CS - 1], 5), "one chunk"), (lambda kv: (kv, -1), "position"),
    (lambda kv: (kv, 3.0), "position"),
])
def test_store_positioned_rejects_bad_items(bad, match):
    e = make_engine()
    (key, kv, _), = segment_items(e, 1)
    chunk, pos = bad(kv)
    with pytest.raises(ValueError, match=match):
        e.store_positioned([(key, chunk, pos)])


def test_segment_keys_differ_from_prefix_keys_and_carry_the_namespace():
    e = make_engine()
    toks = tokens(CS)
    seg = e.keys_of(chunk_hashes(toks, chunk_size=CS, mode="segment", salt=e.salt()))
    assert seg != e.keys(toks)
    assert e.keys_of(chunk_hashes(toks, chunk_size=CS, mode="segment", salt=e.salt("tenant-b"))) != seg
    assert e.keys(toks, mode="segment") == seg  # the same salt keys() uses
