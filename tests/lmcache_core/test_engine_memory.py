"""CacheEngine over its memory tiers (L1, L2): exact round trips, LRU, demotion, pin/hot, keys, single-flight."""

import threading
import time

import pytest
import torch

from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.keys import KVSpec
from tests.helpers import assert_bytes_equal

CS = 16
SPEC = KVSpec("tiny-model", "bfloat16", "flash_attn", num_layers=2, num_kv=2, num_heads=2, head_dim=8,
              chunk_size=CS)
CHUNK_BYTES = 2 * 2 * CS * 2 * 8 * 2  # L * KV * N * H * D * 2 bytes = 2048


def make_engine(l1_chunks=0, l2_chunks=64, **cfg):
    cfg.setdefault("chunk_size", CS)
    config = CacheConfig(max_device_cache_size=f"{l1_chunks * CHUNK_BYTES}B" if l1_chunks else None,
                         max_local_cpu_size=f"{l2_chunks * CHUNK_BYTES}B", **cfg)
    return CacheEngine(config, spec=SPEC, device="cpu")


def tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n,), generator=g).tolist()


def kv_for(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(SPEC.chunk_shape(n), generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("l1,l2", [(64, 0), (0, 64), (64, 64)], ids=["L1", "L2", "L1+L2"])
def test_round_trip_is_exact_and_only_full_chunks_count(l1, l2):
    e = make_engine(l1, l2)
    toks, kv = tokens(100), kv_for(100)
    assert e.lookup(toks) == 0
    assert e.retrieve(toks) == (0, None)
    assert e.store(toks, kv) == 96  # 6 full chunks; the 4-token tail is not stored
    assert e.lookup(toks) == 96
    n, out = e.retrieve(toks)
    assert n == 96
    assert_bytes_equal(out, kv[:, :, :96], "retrieved")
    assert e.lookup(toks[:50]) == 48  # a shorter prompt sharing the prefix
    assert e.lookup(toks + tokens(40, seed=9)) == 96


def test_prefix_keys_change_from_the_edited_chunk_on():
    e = make_engine()
    toks = tokens(96)
    e.store(toks, kv_for(96))
    edited = list(toks)
    edited[40] += 1  # chunk 2
    assert e.lookup(edited) == 2 * CS


def test_segment_mode_finds_chunks_anywhere():
    e = make_engine()
    a, b = tokens(32, seed=1), tokens(32, seed=2)
    kv = kv_for(64)
    e.store(a + b, kv, mode="segment")
    n, out = e.retrieve(b + a, mode="segment")  # same chunks, other order
    assert n == 64
    assert_bytes_equal(out[:, :, :32], kv[:, :, 32:], "b first")
    assert e.lookup(b + a) == 0  # prefix keys are distinct from segment keys


def test_namespaces_and_specs_never_share_entries():
    e = make_engine()
    toks = tokens(64)
    e.store(toks, kv_for(64), namespace="tenant-a")
    assert e.lookup(toks, namespace="tenant-a") == 64
    assert e.lookup(toks, namespace="tenant-b") == 0
    assert e.lookup(toks) == 0
    other = CacheEngine(e.config, spec=KVSpec("other-model", **{k: getattr(SPEC, k) for k in (
        "dtype", "layout", "num_layers", "num_kv", "num_heads", "head_dim", "chunk_size")}), device="cpu")
    other.tiers = e.tiers  # same tiers, other model: different keys
    assert other.lookup(toks, namespace="tenant-a") == 0


def test_lru_evicts_least_recently_used():
    e = make_engine(l1_chunks=0, l2_chunks=3)
    seqs = [tokens(16, seed=s) for s in range(4)]
    for s in seqs[:3]:
        e.store(s, kv_for(16))
    assert e.retrieve(seqs[0])[0] == 16  # touch 0: 1 is now least recent
    e.store(seqs[3], kv_for(16))
    assert [e.lookup(s) for s in seqs] == [16, 0, 16, 16]
    assert e.stats()["L2"]["evictions"] == 1


def test_write_back_demotes_l1_evictions_to_l2():
    e = make_engine(l1_chunks=2, l2_chunks=8, write_policy="write_back")
    seqs = [tokens(16, seed=s) for s in range(5)]
    kvs = [kv_for(16, seed=s) for s in range(5)]
    for s, kv in zip(seqs, kvs):
        e.store(s, kv)
    stats = e.stats()
    assert stats["L1"]["entries"] == 2 and stats["L2"]["entries"] == 3
    for s, kv in zip(seqs, kvs):
        n, out = e.retrieve(s)
        assert n == 16
        assert_bytes_equal(out, kv, "after demotion")


def test_pinned_chunks_survive_eviction_until_unpinned():
    e = make_engine(l2_chunks=4, max_hot_ratio=0.5, hot_hit_threshold=0)
    keep = tokens(32, seed=100)
    e.store(keep, kv_for(32))
    assert e.pin(keep) == 32
    for s in range(6):
        e.store(tokens(16, seed=s), kv_for(16))
    assert e.lookup(keep) == 32
    assert e.stats()["L2"]["pinned_bytes"] == 2 * CHUNK_BYTES
    e.unpin(keep)
    for s in range(6, 10):
        e.store(tokens(16, seed=s), kv_for(16))
    assert e.lookup(keep) == 0


def test_a_pin_follows_its_chunk_into_every_memory_tier():
    """Pinned while only L2 held it: once a read promotes it into L1, it is pinned there too, and L1 traffic
    twice L1's size passes by it; unpinned, it goes like any LRU entry."""
    e = make_engine(l1_chunks=4, l2_chunks=8, max_hot_ratio=0.5, hot_hit_threshold=0, write_policy="write_back")
    keep = tokens(CS, seed=200)
    e.store(keep, kv_for(CS))
    for s in range(8):  # pushes `keep` out of L1 into L2 (write-back demotion)
        e.store(tokens(CS, seed=s), kv_for(CS))
    l1, l2 = e.tiers.memory
    key = e.keys(keep)
    assert l1.contains(key) == [False] and l2.contains(key) == [True]
    assert e.pin(keep) == CS
    e.retrieve(keep)  # promoted into L1
    assert l1.contains(key) == [True] and e.stats()["L1"]["pinned_bytes"] == CHUNK_BYTES
    for s in range(100, 108):
        e.store(tokens(CS, seed=s), kv_for(CS))
    assert l1.contains(key) == [True]
    e.unpin(keep)
    assert e.stats()["L1"]["pinned_bytes"] == 0
    for s in range(200, 208):
        e.store(tokens(CS, seed=s), kv_for(CS))
    assert l1.contains(key) == [False]


def test_a_pin_with_a_ttl_expires_and_a_pin_survives_a_later_store():
    e = make_engine(l2_chunks=2, max_hot_ratio=0.5, hot_hit_threshold=0)
    sys_prompt = tokens(CS, seed=9)
    assert e.pin(sys_prompt, ttl=0.3) == 0  # not stored yet: nothing to pin now...
    e.store(sys_prompt, kv_for(CS))  # ...but the pin waits for it
    for s in range(3):
        e.store(tokens(CS, seed=s), kv_for(CS))
    assert e.lookup(sys_prompt) == CS
    time.sleep(0.35)
    for s in range(3, 6):
        e.store(tokens(CS, seed=s), kv_for(CS))
    assert e.lookup(sys_prompt) == 0


def test_pins_are_capped_by_max_hot_ratio():
    e = make_engine(l2_chunks=4, max_hot_ratio=0.25, hot_hit_threshold=0)
    toks = tokens(32)
    e.store(toks, kv_for(32))
    assert e.pin(toks) == 16  # one chunk of four fits under 25%


def test_hot_by_hits_then_expires_after_hot_cache_ttl():
    e = make_engine(l2_chunks=2, hot_hit_threshold=2, hot_cache_ttl=0.3, max_hot_ratio=0.5)
    sys_prompt = tokens(16, seed=7)
    e.store(sys_prompt, kv_for(16))
    e.retrieve(sys_prompt)
    e.retrieve(sys_prompt)  # second hit: hot
    for s in range(3):
        e.store(tokens(16, seed=s), kv_for(16))
    assert e.lookup(sys_prompt) == 16
    time.sleep(0.35)
    for s in range(3, 6):
        e.store(tokens(16, seed=s), kv_for(16))
    assert e.lookup(sys_prompt) == 0


def test_store_with_pin_is_hot_for_the_ttl():
    e = make_engine(l2_chunks=2, hot_cache_ttl=60, hot_hit_threshold=0)
    toks = tokens(16, seed=3)
    e.store(toks, kv_for(16), pin=True)
    for s in range(4):
        e.store(tokens(16, seed=s + 10), kv_for(16))
    assert e.lookup(toks) == 16


def test_bad_kv_is_rejected_with_the_expected_shape():
    e = make_engine()
    with pytest.raises(ValueError, match=r"kv: expected shape \(2, 2, 32, 2, 8\) and dtype bfloat16.*got \(2, 2, 32, 2, 4\)"):
        e.store(tokens(32), torch.zeros(2, 2, 32, 2, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="kv: expected a staging tensor"):
        e.store(tokens(32), [1, 2])


def test_concurrent_store_and_retrieve_never_tear():
    e = make_engine(l1_chunks=4, l2_chunks=6)
    seqs = [tokens(32, seed=s) for s in range(12)]
    kvs = [kv_for(32, seed=s) for s in range(12)]
    errors = []

    def worker(w):
        try:
            for it in range(150):
                i = (w * 7 + it) % 12
                if it % 3 == 0:
                    e.store(seqs[i], kvs[i])
                else:
                    n, out = e.retrieve(seqs[i])
                    if n:
                        assert torch.equal(out.view(torch.int16), kvs[i][:, :, :n].view(torch.int16)), i
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for name, s in e.stats().items():
        assert s["used_bytes"] <= s["capacity_bytes"], name


def test_single_flight_claims_per_owner():
    e = make_engine()
    toks = tokens(48)
    assert e.claim(toks, owner="req-a").state == "compute"
    busy = e.claim(toks, owner="req-b")
    assert (busy.state, busy.hit_tokens) == ("busy", 0)
    e.store(toks[:32], kv_for(32))  # req-a stored two chunks: their locks are gone, chunk 2 still held
    claim = e.claim(toks, owner="req-b")
    assert (claim.state, claim.hit_tokens) == ("busy", 32)
    e.release(toks, owner="req-a")
    assert e.claim(toks, owner="req-b").state == "compute"
    e.store(toks, kv_for(48))
    assert e.claim(toks, owner="req-c") .state == "hit"


def test_wait_claim_times_out_into_fallback_or_error():
    from lmcache_core.errors import LockTimeoutError

    e = make_engine()
    toks = tokens(16)
    e.claim(toks, owner="holder")
    t0 = time.monotonic()
    assert e.wait_claim(toks, owner="waiter", timeout=0.1).state == "compute"
    assert 0.1 <= time.monotonic() - t0 < 1.0
    strict = make_engine(fallback_on_timeout=False)
    strict.claim(toks, owner="holder")
    with pytest.raises(LockTimeoutError, match="lock_timeout"):
        strict.wait_claim(toks, owner="waiter", timeout=0.05)


def test_wait_claim_returns_hit_when_the_holder_stores():
    e = make_engine()
    toks, kv = tokens(32), kv_for(32)
    e.claim(toks, owner="holder")
    threading.Timer(0.05, lambda: e.store(toks, kv)).start()
    claim = e.wait_claim(toks, owner="waiter", timeout=5)
    assert (claim.state, claim.hit_tokens) == ("hit", 32)


def test_lookup_batch_matches_lookup_one_by_one():
    e = make_engine()
    base = tokens(64, seed=1)
    e.store(base, kv_for(64))
    requests = [base, base[:40], base + tokens(30, seed=2), tokens(64, seed=3), base[:16] + tokens(48, seed=4), []]
    assert e.lookup_batch(requests) == [e.lookup(r) for r in requests] == [64, 32, 64, 0, 16, 0]


def test_engine_without_spec_takes_it_from_the_first_store():
    e = CacheEngine(CacheConfig(chunk_size=CS, max_local_cpu_size="1MB"), lock_timeout=0.5,
                    fallback_on_timeout=True, device="cpu")
    toks, kv = tokens(32), kv_for(32)
    assert e.lookup(toks) == 0
    assert e.store(toks, kv) == 32
    n, out = e.retrieve(toks)
    assert n == 32
    assert_bytes_equal(out, kv, "spec from the first store")


def test_store_and_retrieve_from_a_chunk_boundary():
    e = make_engine()
    toks, kv = tokens(96), kv_for(96)
    assert e.store(toks, kv[:, :, :32]) == 32  # the first two chunks
    assert e.store(toks, kv[:, :, 32:88], start=32) == 48  # chunks 2-4 from a later step; 8 tokens left over
    assert e.lookup(toks) == 80
    n, out = e.retrieve(toks, start=16)
    assert n == 64
    assert_bytes_equal(out, kv[:, :, 16:80], "from chunk 1")
    with pytest.raises(ValueError, match=r"start: expected a token position that is a multiple of chunk_size=16, got 5"):
        e.retrieve(toks, start=5)


# -- keys=, retrieve_chunks, and the memory tier's in-place reads and fills ------------------------------------

def test_keys_passed_in_give_the_same_answers_without_hashing(monkeypatch):
    import lmcache_core.engine as engine_module

    a, b = make_engine(64, 64), make_engine(64, 64)
    toks, kv, longer = tokens(100), kv_for(100), tokens(160, seed=3)
    keys, longer_keys = b.keys(toks, namespace="t"), b.keys(longer)
    assert len(keys) == 6
    hashed = []
    real = engine_module.chunk_hashes
    monkeypatch.setattr(engine_module, "chunk_hashes", lambda *a, **k: hashed.append(1) or real(*a, **k))
    assert a.store(toks, kv, namespace="t") == b.store(toks, kv, namespace="t", keys=keys) == 96
    assert a.lookup(toks, namespace="t") == b.lookup(toks, namespace="t", keys=keys) == 96
    (n1, out1), (n2, out2) = a.retrieve(toks, namespace="t"), b.retrieve(toks, namespace="t", keys=keys)
    assert n1 == n2 == 96
    assert_bytes_equal(out2, out1, "retrieve(keys=)")
    assert len(hashed) == 3  # a's three calls; none of b's
    assert b.retrieve(toks, start=2 * CS, namespace="t", keys=keys)[0] == 64
    assert b.retrieve_chunks(toks, lambda i, kv: None, namespace="t", keys=keys) == 96
    assert b.claim(longer, owner="r", keys=longer_keys).state == "compute"
    assert b.claim(longer, owner="other", keys=longer_keys).state == "busy"
    b.release(longer, owner="r", keys=longer_keys)
    assert b.claim(longer, owner="other", keys=longer_keys).state == "compute"  # released: free again
    assert b.pin(toks, namespace="t", keys=keys) == 96
    b.unpin(toks, namespace="t", keys=keys)
    assert len(hashed) == 3
    with pytest.raises(ValueError, match=r"keys: expected 6 chunk keys for 100 tokens \(chunk_size=16\), got 5"):
        b.lookup(toks, keys=keys[:5])


@pytest.mark.parametrize("l1,l2", [(64, 0), (0, 64), (64, 64)], ids=["L1", "L2", "L1+L2"])
def test_retrieve_chunks_hands_over_each_chunk_in_order(l1, l2):
    e = make_engine(l1, l2)
    toks, kv = tokens(100), kv_for(100)
    e.store(toks, kv)
    seen = []
    assert e.retrieve_chunks(toks, lambda i, c: seen.append((i, c.clone()))) == 96
    assert [i for i, _ in seen] == list(range(6))
    assert_bytes_equal(torch.cat([c for _, c in seen], dim=2), kv[:, :, :96], "chunks handed over")
    seen.clear()
    assert e.retrieve_chunks(toks, lambda i, c: seen.append((i, c.clone())), start=4 * CS) == 2 * CS
    assert_bytes_equal(torch.cat([c for _, c in seen], dim=2), kv[:, :, 64:96], "from a chunk boundary")
    assert e.retrieve_chunks(tokens(100, seed=9), lambda i, c: None) == 0


def test_retrieve_chunks_from_l1_reads_the_entry_in_place_and_promotes_l2_hits():
    e = make_engine(64, 64)
    toks, kv = tokens(64), kv_for(64)
    e.store(toks, kv)
    l1 = e.tiers.memory[0]
    held = [l1.open(k, count=False) for k in e.keys(toks)]
    entries = {h.tensor.data_ptr() for h in held}
    for h in held:
        h.close()
    handed = []
    e.retrieve_chunks(toks, lambda i, c: handed.append(c.data_ptr()))
    assert set(handed) == entries  # the entries themselves: no copy
    l1.clear()
    before = e.stats()
    e.retrieve_chunks(toks, lambda i, c: None)
    after = e.stats()
    assert after["L2"]["hits"] - before["L2"]["hits"] == 4 and after["L1"]["hits"] == before["L1"]["hits"]
    assert l1.contains(e.keys(toks)) == [True] * 4  # promoted without counting L2 hits twice
    n, out = e.retrieve(toks)
    assert n == 64 and e.stats()["L1"]["hits"] - after["L1"]["hits"] == 4
    assert_bytes_equal(out, kv, "promoted copies")


def test_retrieve_chunks_stops_where_consume_raises():
    e = make_engine(0, 64)
    toks, kv = tokens(64), kv_for(64)
    e.store(toks, kv)
    seen = []

    def consume(i, c):
        if i == 2:
            raise RuntimeError("scatter failed")
        seen.append(i)

    with pytest.raises(RuntimeError, match="scatter failed"):
        e.retrieve_chunks(toks, consume)
    assert seen == [0, 1]


def test_memory_tier_put_with_and_read_with():
    from lmcache_core.keys import ChunkKey
    from lmcache_core.tiers.memory import ArenaAllocator, MemoryTier

    tier = MemoryTier("L2", 2 * 64, ArenaAllocator(2 * 64, pin=False), max_protected_bytes=0)
    k1, k2, k3 = (ChunkKey(b"f" * 16, bytes([i]) * 16) for i in range(3))
    ones = torch.ones(16, dtype=torch.float32)
    assert tier.put_with(k1, (16,), torch.float32, lambda dst: dst.fill_(1.0) is not None) is True
    assert tier.put_with(k2, (16,), torch.float32, lambda dst: False) is False  # fill failed: nothing stored
    assert tier.usage().entries == 1 and tier.usage().used_bytes == 64
    with pytest.raises(ZeroDivisionError):
        tier.put_with(k2, (16,), torch.float32, lambda dst: 1 / 0)
    assert tier.usage().used_bytes == 64 and not tier.contains([k2])[0]  # the reservation was given back
    called = []
    assert tier.put_with(k1, (16,), torch.float32, lambda dst: called.append(1)) is True and not called
    assert tier.put_with(k3, (64,), torch.float32, lambda dst: called.append(1)) is None and not called  # no room
    got = []
    assert tier.read_with(k1, lambda t: got.append(t.clone()))
    assert torch.equal(got[0], ones) and tier.stats.hits == 1
    assert tier.read_with(k1, lambda t: None, count=False) and tier.stats.hits == 1
    assert not tier.read_with(k2, lambda t: None) and tier.stats.misses == 1
    assert not tier.read_with(k2, lambda t: None, count=False) and tier.stats.misses == 1


def test_an_entry_removed_while_read_keeps_its_memory_until_the_reader_is_done():
    """read_with runs outside the lock: another thread may evict or delete the entry meanwhile; its arena
    slot is not handed out again until the read has finished."""
    import threading

    from lmcache_core.keys import ChunkKey
    from lmcache_core.tiers.memory import ArenaAllocator, MemoryTier

    tier = MemoryTier("L2", 64, ArenaAllocator(64, pin=False), max_protected_bytes=0)  # one slot
    k1, k2 = (ChunkKey(b"r" * 16, bytes([i]) * 16) for i in range(2))
    tier.put([(k1, torch.full((16,), 1.0))], positions=[7])
    outcome = {}

    def other_thread():  # evicts k1 (the only slot) by storing k2, then deletes what is left
        outcome["put k2"] = tier.put([(k2, torch.full((16,), 2.0))])[0]
        tier.delete([k1])
        outcome["k1 held"] = tier.contains([k1])[0]

    def reader(t, position):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join(timeout=10)  # would deadlock if the reader held the tier's lock
        outcome["alive"] = not worker.is_alive()
        outcome["read"], outcome["position"] = t.clone(), position

    assert tier.read_with(k1, reader, with_position=True)
    assert outcome["alive"] and outcome["position"] == 7
    assert torch.equal(outcome["read"], torch.full((16,), 1.0))  # nobody wrote into the slot being read
    assert outcome["put k2"] is False  # k1 went (evicted) but its slot was still being read
    assert not outcome["k1 held"] and tier.usage().entries == 0
    assert tier.put([(k2, torch.full((16,), 2.0))]) == [True]  # the reader is done: the slot is free again
    got = []
    assert tier.read_with(k2, lambda t: got.append(t.clone())) and torch.equal(got[0], torch.full((16,), 2.0))
