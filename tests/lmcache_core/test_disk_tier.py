"""DiskTier (L3) on real files, one process: round trip, LRU cap, restart, TTL sweep, orphans, symlinks, clear
and faults. Threads and processes sharing a directory: test_disk_processes.py; outside clean-up:
test_disk_cleanup.py; the index alone: test_disk_index.py."""

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lmcache_core import serde
from lmcache_core.errors import CorruptChunkError, TierUnavailableError
from lmcache_core.tiers import disk_files
from lmcache_core.tiers.disk import DiskTier
from tests.lmcache_core.disk_helpers import KiB, chunk_files, key, make_tier, path_of, value, wait_for

__all__ = ["make_tier"]  # a fixture


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

    monkeypatch.setattr(disk_files, "write_all", full)
    assert tier.put([(key(10), value(2000, 10)), (key(11), value(2000, 11))]) == [False, False]
    assert tier.contains([key(10)]) == [False]
    _assert_full_then_recovers(tier, stored, 2000, monkeypatch.undo)


def test_io_error_injected_is_counted_and_a_miss(make_tier, monkeypatch):
    tier = make_tier()

    def broken(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk_files, "write_all", broken)
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
