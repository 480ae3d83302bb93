"""Many threads x thousands of random operations on one CacheEngine with small caps on L1, L2 and L3.

Operations: store (some with pin=True), retrieve of whole sequences and of prefixes, lookup, lookup_batch,
pin, unpin, claim/release, clear. Checked while it runs (a sampler thread, every millisecond): L1 bytes,
L2 arena bytes and L3 bytes (index plus writes in flight) never exceed their caps, pinned plus hot bytes
stay within max_hot_ratio, and the bytes really on disk (L3 on a tmpfs, read atomically with statvfs) stay
within the cap plus the evicted files readers may still hold open. Checked on every call: retrieve returns
exactly the bytes stored for that sequence (no torn or mixed chunk). Checked at the end: the counters add
up with the calls made (each L1 miss asks L2 once, each L2 miss asks L3 once, served chunks = hits of the
tier that served them, pin's disk reads counted apart; Prometheus lookup/hit/retrieve/store counters =
what the callers saw) and entries agree with usage. Both write policies. Plus clear() racing with writes:
the directory never holds more than the cap. tests/lmcache_core covers store/retrieve races on memory
tiers and DiskTier alone.
"""

import os
import random
import subprocess
import threading
import time
from collections import Counter

import pytest

from lmcache_core import metrics
from tests.reliability.common import CHUNK_BYTES, CS, chunk_files, engine, kv_for, same_bytes, tokens

THREADS, OPS = 8, 1000
L1_CHUNKS, L2_CHUNKS = 6, 8
FILE_BYTES = CHUNK_BYTES + 128  # codec none: the payload plus the 128-byte header
L3_CAP = 40 * FILE_BYTES
HOT_RATIO = 0.5
SEQS = 48


# An evicted file that a reader still has open keeps its pages until that reader closes it (POSIX unlink;
# DiskTier reads whole files and closes at once): up to one file per reading thread, beyond the cap. The
# tier's own accounting (used_bytes, index + writes in flight) is held to the cap exactly.
READERS_ALLOWANCE = THREADS
PAGE = os.sysconf("SC_PAGE_SIZE")
FILE_PAGES_BYTES = -(-FILE_BYTES // PAGE) * PAGE  # what one chunk file takes on tmpfs


@pytest.fixture
def l3_root(tmp_path):
    """A 16 MiB tmpfs for L3, so the bytes on disk can be read atomically (statvfs) while threads write;
    None where mount is refused (then the disk check is skipped, the tier's own accounting still checked)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                            capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    yield (mnt if ok else tmp_path), ok
    if ok:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def _tmpfs_used(root) -> int:
    st = os.statvfs(root)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _metric(counter) -> float:
    return counter._value.get()


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_threads_random_operations_small_caps(l3_root, policy):
    mount, on_tmpfs = l3_root
    root = mount / "l3"
    e = engine(l1_chunks=L1_CHUNKS, l2_chunks=L2_CHUNKS, local_cache_dir=str(root),
               max_local_cache_size=f"{L3_CAP}B", codec="none", write_policy=policy,
               hot_hit_threshold=3, hot_cache_ttl=0.2, max_hot_ratio=HOT_RATIO)
    caps = {"L1": L1_CHUNKS * CHUNK_BYTES, "L2": L2_CHUNKS * CHUNK_BYTES, "L3": L3_CAP}
    rng0 = random.Random(5)
    seqs = [tokens(CS * rng0.randint(1, 4), seed=300 + s) for s in range(SEQS)]
    kvs = [kv_for(len(seqs[s]), seed=300 + s) for s in range(SEQS)]
    before = {name: _metric(c) for name, c in (("lookups", metrics.LOOKUPS), ("hit", metrics.HIT_TOKENS),
                                               ("retrieved", metrics.RETRIEVED_TOKENS),
                                               ("stored", metrics.STORED_TOKENS))}
    # pin() brings chunks held only on disk into memory: count those disk reads apart (a thread-local flag
    # set around TierStack._prefetch_group, which pin uses and nothing else does with prefetch off)
    pin_reads: Counter = Counter()
    in_pin = threading.local()
    prefetch_group, l3_get = e.tiers._prefetch_group, e.tiers.byte_tiers[0].get

    def counted_prefetch_group(keys):
        in_pin.on = True
        try:
            return prefetch_group(keys)
        finally:
            in_pin.on = False

    def counted_l3_get(keys):
        found = l3_get(keys)
        if getattr(in_pin, "on", False):
            with lock:
                pin_reads["asked"] += len(keys)
                pin_reads["hit"] += sum(buf is not None for buf in found)
        return found

    e.tiers._prefetch_group, e.tiers.byte_tiers[0].get = counted_prefetch_group, counted_l3_get
    failures: list[str] = []
    totals: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    peaks: Counter = Counter()
    samples = [0]

    def sampler():
        while not stop.is_set():
            st = e.stats()
            for tier in ("L1", "L2", "L3"):
                peaks[tier] = max(peaks[tier], st[tier]["used_bytes"])
                if st[tier]["used_bytes"] > caps[tier]:
                    failures.append(f"{tier} used {st[tier]['used_bytes']} > cap {caps[tier]}")
            for tier in ("L1", "L2"):
                if st[tier]["pinned_bytes"] > HOT_RATIO * caps[tier]:
                    failures.append(f"{tier} pinned+hot {st[tier]['pinned_bytes']} > {HOT_RATIO} x cap")
            if on_tmpfs:  # chunk and temp files, atomically; whole pages per file
                on_disk = _tmpfs_used(mount)
                peaks["disk"] = max(peaks["disk"], on_disk)
                if on_disk > (caps["L3"] // FILE_BYTES + READERS_ALLOWANCE) * FILE_PAGES_BYTES:
                    failures.append(f"{on_disk // FILE_PAGES_BYTES} chunk files on disk, cap "
                                    f"{caps['L3'] // FILE_BYTES} + {READERS_ALLOWANCE}")
            samples[0] += 1
            time.sleep(0.001)

    def worker(w: int):
        rng = random.Random(w)
        mine = Counter()
        pinned: list[int] = []
        try:
            for _ in range(OPS):
                s = rng.randrange(SEQS)
                r = rng.random()
                if r < 0.25:
                    mine["stored"] += e.store(seqs[s], kvs[s], pin=rng.random() < 0.1)
                elif r < 0.60:
                    k = rng.randint(1, len(seqs[s]) // CS)
                    n, out = e.retrieve(seqs[s][: k * CS])
                    mine["retrieves"] += 1
                    mine["served"] += n // CS
                    if n % CS or n > k * CS or (n and not same_bytes(out, kvs[s][:, :, :n])):
                        failures.append(f"retrieve of sequence {s}: {n} tokens, not the bytes stored")
                elif r < 0.75:
                    n = e.lookup(seqs[s])
                    mine["lookups"] += 1
                    mine["hit"] += n
                    if n % CS or n > len(seqs[s]):
                        failures.append(f"lookup of sequence {s} answered {n}")
                elif r < 0.80:
                    batch = [seqs[rng.randrange(SEQS)] for _ in range(4)]
                    hits = e.lookup_batch(batch)
                    mine["lookups"] += len(batch)
                    mine["hit"] += sum(hits)
                elif r < 0.87:
                    e.pin(seqs[s])
                    pinned.append(s)
                elif r < 0.94:
                    if pinned:
                        e.unpin(seqs[pinned.pop(rng.randrange(len(pinned)))])
                elif r < 0.997:
                    claim = e.claim(seqs[s], owner=f"w{w}")
                    if claim.state == "compute":
                        e.release(seqs[s], owner=f"w{w}")
                else:
                    e.clear()
            for s in pinned:
                e.unpin(seqs[s])
        except Exception as exc:  # noqa: BLE001 - nothing may reach the caller
            failures.append(f"worker {w} raised {exc!r}")
        with lock:
            totals.update(mine)

    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    e.flush()
    elapsed = time.monotonic() - t0
    stop.set()
    sampling.join(5)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not failures, failures[:5]

    st = e.stats()
    l1, l2, l3 = st["L1"], st["L2"], st["L3"]
    print(f"\n[concurrency {policy}] {THREADS} threads x {OPS} ops in {elapsed:.1f} s; {samples[0]} samples; "
          f"peak used L1 {peaks['L1']}/{caps['L1']}, L2 {peaks['L2']}/{caps['L2']}, L3 {peaks['L3']}/{caps['L3']} "
          f"(on disk {peaks['disk'] // FILE_PAGES_BYTES} files); served {totals['served']} chunks in "
          f"{totals['retrieves']} retrieves; "
          f"hits L1 {l1['hits']} L2 {l2['hits']} L3 {l3['hits']}; evictions L1 {l1['evictions']} "
          f"L2 {l2['evictions']} L3 {l3['evictions']}")
    # every chunk read asks L1; each L1 miss asks L2 once; each L2 miss asks L3 once (prefetch is off);
    # pin() reads L3 for chunks only it holds
    assert l2["hits"] + l2["misses"] == l1["misses"], (l1, l2)
    assert l3["hits"] + l3["misses"] == l2["misses"] + pin_reads["asked"], (l2, l3, pin_reads)
    assert totals["served"] == l1["hits"] + l2["hits"] + l3["hits"] - pin_reads["hit"], (
        "served chunks != hits of the serving tiers")
    assert l3["corrupt"] == 0 and not l3["errors"]
    deltas = {name: _metric(c) - before[name] for name, c in (
        ("lookups", metrics.LOOKUPS), ("hit", metrics.HIT_TOKENS), ("retrieved", metrics.RETRIEVED_TOKENS),
        ("stored", metrics.STORED_TOKENS))}
    assert deltas == {"lookups": totals["lookups"], "hit": totals["hit"], "retrieved": totals["served"] * CS,
                      "stored": totals["stored"]}, (deltas, totals)
    for tier in (l1, l2):
        assert tier["used_bytes"] == tier["entries"] * CHUNK_BYTES, tier
    files = chunk_files(root)
    on_disk = sum(f.stat().st_size for f in files)
    assert l3["entries"] == len(files) and l3["used_bytes"] == on_disk, (l3, len(files), on_disk)
    # the caps were reached: the test exercised eviction, not an empty cache
    assert l1["evictions"] and l2["evictions"] and l3["evictions"] and peaks["L3"] > caps["L3"] - 2 * FILE_BYTES
    e.close()


def test_clear_while_writing_never_overfills_the_disk(l3_root):
    """clear() racing with writes: the directory never holds more than the cap (no readers here, so no
    allowance). Before the fix, clear() forgot the index before unlinking and writers refilled the cap
    while the old files were still there (measured: 70-80 files against a cap of 40)."""
    mount, on_tmpfs = l3_root
    if not on_tmpfs:
        pytest.skip("needs a tmpfs to read the bytes on disk atomically (mount refused)")
    root = mount / "l3"
    e = engine(l2_chunks=2, local_cache_dir=str(root), max_local_cache_size=f"{L3_CAP}B", codec="none")
    stop = threading.Event()
    peak, clears, failures = [0], [0], []

    def writer(w: int):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                e.store(tokens(CS, seed=10**7 * (w + 1) + i), kv_for(CS, seed=i))
            except Exception as exc:  # noqa: BLE001
                failures.append(repr(exc))
                return

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], _tmpfs_used(mount))

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(3)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.02)
        e.tiers.byte_tiers[0].clear()  # the tier's clear alone: the engine's also waits for writes
        clears[0] += 1
    stop.set()
    for t in threads:
        t.join(10)
    e.flush()
    files = peak[0] // FILE_PAGES_BYTES
    print(f"\n[clear race] {clears[0]} clears during writes; peak {files} chunk files on disk, "
          f"cap {L3_CAP // FILE_BYTES}")
    assert not failures, failures[:3]
    assert clears[0] >= 10 and files <= L3_CAP // FILE_BYTES
    e.close()
