"""Chunk files deleted from outside (issue #18): a `find -delete` or any process may remove chunk files at any
moment beside a busy DiskTier. That must cost misses only: no exception, no wrong bytes, no fault counted;
the index drops a file on the read that misses it and at the next rescan, and usage then equals the disk."""

import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from lmcache_core.tiers import disk_files
from tests.lmcache_core.disk_helpers import chunk_files, key, make_tier, path_of, value

__all__ = ["make_tier"]  # a fixture


def on_disk(root: Path) -> tuple[int, int]:
    """(bytes, files) of the chunk files under root, as `usage()` counts them."""
    files = chunk_files(root)
    return sum(p.stat().st_size for p in files), len(files)


def test_layout_helpers_match_the_files_written(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier()
    keys = [key(i) for i in range(8)]
    assert tier.put([(k, value(500, i)) for i, k in enumerate(keys)]) == [True] * 8
    written = {p.relative_to(root) for p in chunk_files(root)}
    assert written == {Path(disk_files.relative_path(k.name)) for k in keys}
    assert written == {p.relative_to(root) for p in root.glob(f"*/{disk_files.CHUNK_GLOB}")}
    assert all(path_of(root, k).exists() for k in keys)
    assert disk_files.cleanup_command("/var/cache/lmc") == "find /var/cache/lmc -name '*.lmc' -mmin +1440 -delete"


def test_the_cleanup_command_deletes_old_chunks_and_nothing_else(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier(rescan_interval=3600)
    items = [(key(i), value(2000, i)) for i in range(6)]
    assert tier.put(items) == [True] * 6
    day_ago = time.time() - 2 * 86400
    for k, _ in items[:4]:  # four chunks not written for two days
        os.utime(path_of(root, k), (day_ago, day_ago))
    sub = path_of(root, key(0)).parent
    in_flight = sub / f".{key(0).name}.lmc.4242.deadbeef.tmp"  # another writer's temp file, as old
    in_flight.write_bytes(b"partial")
    os.utime(in_flight, (day_ago, day_ago))
    (root / "README").write_text("keep")
    (sub / "notes.txt").write_text("keep")

    subprocess.run(["sh", "-c", disk_files.cleanup_command(str(root))], check=True, timeout=30)
    assert sorted(chunk_files(root)) == sorted(path_of(root, k) for k, _ in items[4:])
    assert in_flight.exists() and (root / "README").exists() and (sub / "notes.txt").exists()

    assert tier.get([key(0), key(1), key(4)]) == [None, None, items[4][1]]
    assert tier.usage().entries == 4, "the two deleted files read are dropped at once; two wait for the rescan"
    tier.rescan()
    assert (tier.usage().used_bytes, tier.usage().entries) == on_disk(root) == (2 * 2000, 2)
    assert not tier.stats.errors, "a file deleted from outside is a miss, not a fault"
    assert tier.put(items[:1]) == [True] and tier.get([key(0)]) == [items[0][1]]


def test_a_read_that_misses_drops_the_file_from_the_index(make_tier, tmp_path):
    tier = make_tier(rescan_interval=3600)
    tier.put([(key(1), value(1000, 1)), (key(2), value(1000, 2))])
    assert tier.contains([key(1)]) == [True]
    os.unlink(path_of(tmp_path / "l3", key(1)))
    assert tier.get([key(1)]) == [None]
    assert tier.stats.misses == 1 and not tier.stats.errors, "a vanished file is a miss, not a fault"
    assert (tier.usage().entries, tier.usage().used_bytes) == (1, 1000)
    assert tier.contains([key(1)]) == [False]


def test_files_deleted_unread_leave_the_index_at_the_rescan(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier(rescan_interval=3600)
    tier.put([(key(i), value(1000, i)) for i in range(5)])
    for p in chunk_files(root)[:3]:
        p.unlink()
    tier.rescan()
    assert (tier.usage().used_bytes, tier.usage().entries) == on_disk(root) == (2000, 2)
    assert tier.index.sizes()["entries"] == 2


def test_a_removed_fanout_directory_costs_misses_then_fills_again(make_tier, tmp_path):
    root = tmp_path / "l3"
    tier = make_tier(rescan_interval=3600)
    items = [(key(i), value(1500, i)) for i in range(12)]
    tier.put(items)
    shutil.rmtree(path_of(root, key(0)).parent)  # e.g. `find DIR -delete` with no -name
    gone = [not path_of(root, k).exists() for k, _ in items]
    assert gone[0] and not all(gone)
    assert tier.get([k for k, _ in items]) == [None if g else v for (_, v), g in zip(items, gone)]
    assert tier.put(items[:1]) == [True], "the put makes the directory again"
    assert tier.get([key(0)]) == [items[0][1]]
    tier.rescan()
    assert (tier.usage().used_bytes, tier.usage().entries) == on_disk(root)
    assert not tier.stats.errors


def test_random_deletions_beside_busy_threads_cost_misses_only(make_tier, tmp_path):
    """Four threads store and read 24 keys against a cap that forces evictions, a fifth deletes chunk files
    (and now and then an emptied fan-out directory) at random moments, and the rescan runs every 20 ms."""
    root = tmp_path / "l3"
    sizes, cap = [3000, 5000, 8000], 60_000
    tier = make_tier(capacity=cap, rescan_interval=0.02)
    stop = threading.Event()
    failures: list[str] = []
    counts: list[Counter] = []

    def worker(seed: int) -> None:
        rng, seen = random.Random(seed), Counter()
        counts.append(seen)
        try:
            while not stop.is_set():
                i = rng.randrange(24)
                expected = value(sizes[i % 3], i)
                if rng.random() < 0.5:
                    seen["stored"] += tier.put([(key(i), expected)])[0]
                    if tier.usage().used_bytes > cap:
                        failures.append(f"usage {tier.usage().used_bytes} > cap {cap}")
                else:
                    (got,) = tier.get([key(i)])
                    seen["miss" if got is None else "hit"] += 1
                    if got is not None and got != expected:
                        failures.append(f"get({i}): {len(got)} bytes other than those stored")
        except Exception as e:  # noqa: BLE001 - any exception is the failure under test
            failures.append(repr(e))

    def deleter() -> None:
        rng, seen = random.Random(99), Counter()
        counts.append(seen)
        while not stop.is_set():
            files = chunk_files(root)
            for p in rng.sample(files, min(len(files), rng.randint(1, 3))):
                try:
                    p.unlink()
                    seen["deleted"] += 1
                except FileNotFoundError:
                    pass
            if rng.random() < 0.05:
                for sub in root.iterdir():
                    try:
                        sub.rmdir()  # only an empty one goes
                        seen["rmdir"] += 1
                    except OSError:
                        pass
            time.sleep(rng.uniform(0, 0.004))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)] + [threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    total = sum(counts, Counter())
    print(f"\n[outside deletions] {dict(total)}; tier {tier.stats}")
    assert not failures, failures[:5]
    assert total["deleted"] > 50 and total["stored"] > 50 and total["hit"] > 50 and total["miss"] > 50, total
    assert not tier.stats.errors, f"deletions must be misses, not faults: {dict(tier.stats.errors)}"
    left = chunk_files(root)
    assert len(left) >= 3, "the cap holds about ten files: some are left"
    for p in left[:2]:  # deleted last, never read: only the rescan can notice these
        p.unlink()
    tier.rescan()
    assert (tier.usage().used_bytes, tier.usage().entries) == on_disk(root)
    assert tier.usage().used_bytes <= cap
    for p in chunk_files(root):  # what is left is whole and under its own name
        i = next(i for i in range(24) if key(i).name == p.name[:-4])
        assert p.read_bytes() == value(sizes[i % 3], i)
    sizes_now = tier.index.sizes()
    assert sizes_now["writing"] == sizes_now["cancel"] == sizes_now["removing"] == 0, sizes_now
