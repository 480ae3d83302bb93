"""DiskTier (L3) on real files: round trip, LRU cap, restart, TTL sweep, orphans, faults, and several
processes and threads sharing one directory. Values carry a blake2b digest of their body, so a torn or
mixed file is caught."""

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lmcache_core import serde
from lmcache_core.errors import CorruptChunkError, TierUnavailableError
from lmcache_core.keys import ChunkKey
from lmcache_core.tiers import disk
from lmcache_core.tiers.disk import DiskTier

REPO = Path(__file__).resolve().parents[2]
KiB = 1024


def key(i: int) -> ChunkKey:
    return ChunkKey(b"\x11" * 16, hashlib.blake2b(str(i).encode(), digest_size=16).digest())


def value(size: int, seed: int | None = None) -> bytes:
    """`size` bytes: a 16-byte blake2b digest of the body, then the body."""
    body = random.Random(seed).randbytes(size - 16)
    return hashlib.blake2b(body, digest_size=16).digest() + body


def whole(v: bytes) -> bool:
    return len(v) > 16 and hashlib.blake2b(v[16:], digest_size=16).digest() == v[:16]


def path_of(root: Path, k: ChunkKey) -> Path:
    return root / k.chunk_hash.hex()[:2] / f"{k.name}.lmc"


def chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob("??/*.lmc"))


def wait_for(cond, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def make_tier(tmp_path):
    tiers = []

    def make(capacity: int = 1 << 30, path: Path | None = None, **kwargs) -> DiskTier:
        tier = DiskTier(str(path or tmp_path / "l3"), capacity, **kwargs)
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()


# -- one process ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["never", "file", "always"])
def test_round_trip(make_tier, tmp_path, fsync):
    tier = make_tier(fsync=fsync)
    items = [(key(i), value(1000 + i, seed=i)) for i in range(5)]
    assert tier.put(items) == [True] * 5
    assert tier.get([k for k, _ in items] + [key(99)]) == [v for _, v in items] + [None]
    assert tier.contains([key(0), key(99)]) == [True, False]
    assert path_of(tmp_path / "l3", key(3)).read_bytes() == items[3][1]
    assert not list((tmp_path / "l3").glob("??/.*.tmp")), "no temp file may outlive a put"
    s = tier.stats
    assert (s.hits, s.misses, s.bytes_written) == (5, 1, sum(len(v) for _, v in items))
    assert s.bytes_read == s.bytes_written and not s.errors
    assert tier.usage().used_bytes == s.bytes_written and tier.usage().entries == 5
    tier.delete([key(0), key(99)])
    assert tier.get([key(0)]) == [None] and not path_of(tmp_path / "l3", key(0)).exists()
    assert tier.usage().entries == 4


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        DiskTier(str(tmp_path), 100, fsync="sometimes")
    with pytest.raises(ValueError, match="capacity"):
        DiskTier(str(tmp_path), 0)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(TierUnavailableError, match="local_cache_dir"):
        DiskTier(str(tmp_path / "file" / "sub"), 100)


def test_cap_evicts_least_recently_used(make_tier, tmp_path):
    size = 10 * KiB
    tier = make_tier(capacity=3 * size)
    assert tier.put([(key(i), value(size, i)) for i in range(3)]) == [True] * 3
    assert tier.get([key(0)])[0] is not None  # 0 is now the most recent; 1 the least
    assert tier.put([(key(3), value(size, 3))]) == [True]
    assert tier.contains([key(i) for i in range(4)]) == [True, False, True, True]
    assert not path_of(tmp_path / "l3", key(1)).exists()
    tier.contains([key(2)])  # contains does not count as a use
    assert tier.put([(key(4), value(size, 4))]) == [True]
    assert tier.contains([key(i) for i in range(5)]) == [True, False, False, True, True]
    assert tier.stats.evictions == 2 and tier.usage().used_bytes == 3 * size
    assert len(chunk_files(tmp_path / "l3")) == 3
    assert tier.put([(key(5), value(3 * size + 1, 5))]) == [False], "larger than the cap: refused"


def test_restart_reindexes_and_ranks_untouched_files_by_mtime(make_tier, tmp_path):
    size = 4 * KiB
    first = make_tier()
    first.put([(key(i), value(size, i)) for i in range(4)])
    first.close()
    now = time.time()
    for i in range(4):  # oldest write first: 2, 0, 3, 1
        os.utime(path_of(tmp_path / "l3", key(i)), (now, now - 100 + [10, 30, 0, 20][i]))
    second = make_tier(capacity=2 * size)  # a smaller cap: the start scan evicts the two oldest
    assert second.usage().entries == 2 and second.usage().used_bytes == 2 * size
    assert second.contains([key(i) for i in range(4)]) == [False, True, False, True]
    assert second.get([key(1), key(3)]) == [value(size, 1), value(size, 3)]


def test_ttl_expired_get_is_a_miss_and_removes_the_file(make_tier, tmp_path):
    tier = make_tier(ttl=0.5, sweep_interval=3600, rescan_interval=3600)
    tier.put([(key(1), value(1000, 1))])
    assert tier.get([key(1)])[0] is not None
    time.sleep(0.6)
    assert tier.get([key(1)]) == [None]
    assert not path_of(tmp_path / "l3", key(1)).exists() and tier.usage().entries == 0


def test_ttl_sweeper_removes_stale_files_at_start_and_in_background(make_tier, tmp_path):
    seed = make_tier()
    seed.put([(key(1), value(1000, 1))])
    seed.close()
    old = time.time() - 10
    os.utime(path_of(tmp_path / "l3", key(1)), (old, old))
    tier = make_tier(ttl=0.5, sweep_interval=0.1)
    assert not path_of(tmp_path / "l3", key(1)).exists(), "the sweep runs once at start"
    tier.put([(key(2), value(1000, 2))])
    wait_for(lambda: not path_of(tmp_path / "l3", key(2)).exists(), 5, "the sweeper to remove a stale file")
    assert tier.usage().entries == 0 and tier.stats.evictions == 2


def test_orphan_temp_files_removed_at_start_and_never_served(make_tier, tmp_path):
    root = tmp_path / "l3"
    k_old, k_young = key(1), key(2)
    for k, age in ((k_old, 120), (k_young, 0)):
        sub = path_of(root, k).parent
        sub.mkdir(parents=True, exist_ok=True)
        tmp = sub / f".{k.name}.lmc.4242.deadbeef.tmp"
        tmp.write_bytes(value(1000, 9))
        os.utime(tmp, (time.time() - age,) * 2)
    tier = make_tier(orphan_grace=60)
    assert not list(path_of(root, k_old).parent.glob(".*.tmp")), "a crashed writer's old temp file is removed"
    assert list(path_of(root, k_young).parent.glob(".*.tmp")), "a young one may belong to a live writer"
    assert tier.get([k_old, k_young]) == [None, None]
    assert tier.contains([k_young]) == [False] and tier.usage().entries == 0
    tier.clear()
    assert not list(root.glob("??/.*.tmp"))


def test_garbage_and_truncated_files_are_returned_as_bytes(make_tier, tmp_path):
    tier = make_tier()
    root = tmp_path / "l3"
    k = key(1)
    packed = serde.pack(k.raw, torch.uint8, (64,), "none", (bytes(range(64)),))
    path_of(root, k).parent.mkdir(parents=True)
    path_of(root, k).write_bytes(packed[:100])  # written behind the tier's back, truncated
    (got,) = tier.get([k])
    assert got == packed[:100], "the tier returns what is there; the engine verifies"
    with pytest.raises(CorruptChunkError):
        serde.unpack(got, k.raw)
    tier.delete([k])  # what the engine does with a chunk that fails verification
    assert not path_of(root, k).exists() and tier.get([k]) == [None]
    path_of(root, key(2)).parent.mkdir(parents=True, exist_ok=True)
    path_of(root, key(2)).write_bytes(b"")
    assert tier.get([key(2)]) == [b""]


def test_vanished_file_is_a_clean_miss(make_tier, tmp_path):
    tier = make_tier()
    tier.put([(key(1), value(1000, 1))])
    assert tier.contains([key(1)]) == [True]
    os.unlink(path_of(tmp_path / "l3", key(1)))  # e.g. another process's evictor
    assert tier.get([key(1)]) == [None]
    assert tier.stats.misses == 1 and not tier.stats.errors, "a vanished file is a miss, not a fault"
    assert tier.usage().entries == 0 and tier.usage().used_bytes == 0


def test_symlinks_are_not_followed(make_tier, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.lmc"
    secret.write_bytes(b"not yours")
    root = tmp_path / "l3"
    tier = make_tier()
    path_of(root, key(1)).parent.mkdir(parents=True)
    path_of(root, key(1)).symlink_to(secret)
    sub2 = path_of(root, key(2)).parent  # a fan-out directory replaced by a symlink
    assert sub2 != path_of(root, key(1)).parent
    sub2.symlink_to(outside, target_is_directory=True)
    (outside / path_of(root, key(2)).name).write_bytes(b"not yours either")
    assert tier.get([key(1), key(2)]) == [None, None]
    assert tier.contains([key(1), key(2)]) == [False, False]
    assert tier.put([(key(2), value(100, 2))]) == [False]
    tier.clear()
    assert secret.read_bytes() == b"not yours" and tier.usage().entries == 0
    assert sorted(p.name for p in outside.iterdir()) == sorted([secret.name, path_of(root, key(2)).name])
    assert tier.stats.errors["io"] > 0, "a symlink where a file or directory should be is counted"


def test_clear_removes_only_chunk_and_temp_files(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier()
    tier.put([(key(i), value(500, i)) for i in range(10)])
    (root / "README").write_text("keep")
    (path_of(root, key(0)).parent / "notes.txt").write_text("keep")
    tier.clear()
    assert chunk_files(root) == [] and tier.usage().entries == 0 and tier.usage().used_bytes == 0
    assert (root / "README").exists() and (path_of(root, key(0)).parent / "notes.txt").exists()
    assert tier.put([(key(1), value(500, 1))]) == [True]


def test_close_is_idempotent_and_stops_the_sweeper(make_tier):
    tier = make_tier(ttl=1, sweep_interval=0.05)
    tier.close()
    tier.close()
    assert not tier._thread.is_alive()


# -- faults --------------------------------------------------------------------------------------------


def _assert_full_then_recovers(tier: DiskTier, stored: list, size: int, free) -> None:
    assert not tier.writable and tier.stats.errors["disk_full"] == 1
    assert tier.put([(key(1000), value(size, 1000))]) == [False], "no writes during the back-off"
    assert tier.stats.errors["disk_full"] == 1, "a refused put does not try the disk again"
    assert tier.get([k for k, _ in stored]) == [v for _, v in stored], "reads continue"
    root = Path(tier.root)
    assert not list(root.glob("??/.*.tmp")), "the failed write left no temp file"
    free()
    wait_for(lambda: tier.writable, 5, "the disk-full back-off to end")
    assert tier.put([(key(1001), value(size, 1001))]) == [True]
    assert tier.get([key(1001)]) == [value(size, 1001)]


def test_disk_full_injected_enospc(make_tier, monkeypatch):
    tier = make_tier(full_backoff=0.3)
    stored = [(key(i), value(2000, i)) for i in range(3)]
    assert tier.put(stored) == [True] * 3

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk, "_write_all", full)
    assert tier.put([(key(10), value(2000, 10)), (key(11), value(2000, 11))]) == [False, False]
    assert tier.contains([key(10)]) == [False]
    _assert_full_then_recovers(tier, stored, 2000, monkeypatch.undo)


def test_io_error_injected_is_counted_and_a_miss(make_tier, monkeypatch):
    tier = make_tier()

    def broken(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk, "_write_all", broken)
    assert tier.put([(key(1), value(100, 1))]) == [False]
    assert tier.writable and tier.stats.errors == {"io": 1} and tier.usage().used_bytes == 0


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run mount to make a 1 MiB tmpfs: {e}")
    if proc.returncode != 0:
        pytest.skip(f"mounting a 1 MiB tmpfs is not permitted here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def test_disk_full_real_small_filesystem(make_tier, small_fs):
    size = 200 * KiB
    tier = make_tier(capacity=100 << 20, path=small_fs / "l3", full_backoff=0.3)
    stored = []
    for i in range(20):
        if tier.put([(key(i), value(size, i))]) != [True]:
            break
        stored.append((key(i), value(size, i)))
    assert 2 <= len(stored) < 6, f"a 1 MiB file system holds a few {size}-byte chunks, got {len(stored)}"

    def free():
        tier.delete([k for k, _ in stored[:2]])
        del stored[:2]

    _assert_full_then_recovers(tier, stored, size, free)


# -- threads and processes -----------------------------------------------------------------------------


def test_threads_put_get_delete_against_a_tiny_cap(make_tier, tmp_path):
    sizes = [3000, 5000, 8000]
    cap = 20000
    tier = make_tier(capacity=cap, rescan_interval=0.05)
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:
                i, op = rng.randrange(16), rng.random()
                if op < 0.45:
                    tier.put([(key(i), value(sizes[i % 3], i))])
                    if tier.usage().used_bytes > cap:
                        failures.append(f"usage {tier.usage().used_bytes} > cap {cap} after a put")
                elif op < 0.9:
                    (got,) = tier.get([key(i)])
                    if got is not None and got != value(sizes[i % 3], i):
                        failures.append(f"get({i}) returned {len(got)} wrong bytes")
                else:
                    tier.delete([key(i)])
        except Exception as e:  # noqa: BLE001 - any exception is the failure under test
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    on_disk = sum(p.stat().st_size for p in chunk_files(tmp_path / "l3"))
    assert on_disk == tier.usage().used_bytes <= cap
    assert len(chunk_files(tmp_path / "l3")) == tier.usage().entries
    assert tier.stats.evictions > 0 and not tier.stats.errors


WORKER = textwrap.dedent("""
    import hashlib, json, random, sys, time, types
    # the worker needs only the disk tier: skip the package __init__ (torch, kernels), ~2 s per process
    sys.modules["lmcache_core"] = types.ModuleType("lmcache_core")
    sys.modules["lmcache_core"].__path__ = [sys.argv[2]]
    from lmcache_core.keys import ChunkKey
    from lmcache_core.tiers.disk import DiskTier

    args = json.loads(sys.argv[1])
    def key(i):
        return ChunkKey(b"\\x11" * 16, hashlib.blake2b(str(i).encode(), digest_size=16).digest())
    def value(size, seed):
        body = random.Random(seed).randbytes(size - 16)
        return hashlib.blake2b(body, digest_size=16).digest() + body
    tier = DiskTier(args["dir"], args["cap"], rescan_interval=args.get("rescan", 10))
    rng, n, deadline = random.Random(args.get("seed")), 0, time.monotonic() + args.get("seconds", 0)
    if args["mode"] == "write":
        assert all(tier.put([(key(i), value(args["size"], i)) for i in args["keys"]]))
    while args["mode"] == "loop" and time.monotonic() < deadline:
        i = rng.choice(args["keys"])
        tier.put([(key(i), value(args["size"] + rng.randrange(64), rng.random()))])
        n += 1
    tier.close()
    print(json.dumps({"puts": n, "evictions": tier.stats.evictions, "errors": dict(tier.stats.errors)}))
""")


def run_worker(tmp_path: Path, **args) -> subprocess.Popen:
    script = tmp_path / "disk_worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(script), json.dumps(args), str(REPO / "lmcache_core")]
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_other_process_chunks_are_found_without_restart(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier(rescan_interval=3600)
    finish(run_worker(tmp_path, mode="write", dir=str(root), cap=1 << 30, keys=[0, 1], size=10 * KiB))
    assert tier.usage().entries == 0
    assert tier.contains([key(0)]) == [True], "found on disk (stat) though not in the index"
    assert tier.get([key(1)]) == [value(10 * KiB, 1)]
    assert tier.usage().entries == 2 and tier.usage().used_bytes == 20 * KiB


def test_rescan_counts_other_process_writes_and_enforces_the_cap(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier(capacity=5 * 10 * KiB, rescan_interval=0.2)
    tier.put([(key(100), value(10 * KiB, 100))])  # older than every file the other process writes
    finish(run_worker(tmp_path, mode="write", dir=str(root), cap=1 << 30, keys=list(range(6)), size=10 * KiB))
    wait_for(lambda: len(chunk_files(root)) <= 5, 5, "the rescan to enforce the cap")
    assert tier.usage().used_bytes == 5 * 10 * KiB
    # untouched files rank by mtime: this process's old chunk and the other's first are the victims
    assert tier.contains([key(100)] + [key(i) for i in range(6)]) == [False, False] + [True] * 5


def test_concurrent_writers_of_one_key_never_tear_it(make_tier, tmp_path):
    root = tmp_path / "l3"
    writers = [run_worker(tmp_path, mode="loop", dir=str(root), cap=1 << 30, keys=[7], size=256 * KiB,
                          seconds=1.5, seed=s) for s in range(2)]
    tier = make_tier()
    reads = hits = 0
    while any(w.poll() is None for w in writers):
        (got,) = tier.get([key(7)])
        reads += 1
        if got is not None:
            hits += 1
            assert whole(got), f"read {reads}: a torn or mixed file of {len(got)} bytes"
    results = [finish(w) for w in writers]
    assert all(r["puts"] > 20 and not r["errors"] for r in results), results
    assert hits > 20 and whole(tier.get([key(7)])[0])
    assert not list(root.glob("??/.*.tmp")), "no temp file is left behind"


def test_reader_during_another_process_evicting_sees_whole_or_miss(make_tier, tmp_path):
    root = tmp_path / "l3"
    keys = list(range(8))
    evictor = run_worker(tmp_path, mode="loop", dir=str(root), cap=3 * 40 * KiB, keys=keys, size=32 * KiB,
                         seconds=1.5, seed=1)
    tier = make_tier()
    rng, hits, misses = random.Random(0), 0, 0
    while evictor.poll() is None:
        (got,) = tier.get([key(rng.choice(keys))])
        if got is None:
            misses += 1
        else:
            hits += 1
            assert whole(got), f"a partial read of {len(got)} bytes"
    result = finish(evictor)
    assert result["evictions"] > 20 and not result["errors"], result
    assert hits > 20 and misses > 20, (hits, misses)
