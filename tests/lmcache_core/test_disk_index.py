"""DiskIndex alone (no files): the cap and LRU order, the put protocol, removals racing reads, writes and
scans, and a random sequence of operations checked against a plain model of what is indexed."""

import random
import time

from lmcache_core.tiers.disk_index import LRU_SLACK, DiskIndex


def put(index: DiskIndex, name: str, n: int, mtime: float | None = None) -> list[str]:
    """A whole successful put; returns the victims it evicted (reported removed, as the tier does)."""
    ok, victims = index.reserve(name, n)
    index.removed(victims)
    assert ok, f"reserve({name!r}, {n}) refused"
    assert not index.wrote(name, n, True, time.time() if mtime is None else mtime)
    return victims


def test_reserve_counts_a_put_before_it_is_written():
    index = DiskIndex(100)
    ok, victims = index.reserve("a", 60)
    assert ok and victims == [] and index.usage() == (60, 0)
    assert index.reserve("b", 50) == (False, []), "60 reserved + 50 > 100, and nothing indexed to evict"
    assert not index.wrote("a", 60, True, time.time())
    assert index.usage() == (60, 1)
    ok, _ = index.reserve("c", 30)
    assert not index.wrote("c", 30, False, time.time())  # the write failed
    assert index.usage() == (60, 1)
    assert index.reserve("d", 101) == (False, []), "larger than the capacity: refused without evicting"
    assert index.usage() == (60, 1)


def test_evicts_least_recently_used_and_files_never_used_rank_by_mtime():
    index = DiskIndex(300)
    now = time.time()
    scan = index.scan_begin()
    index.scan_found(scan, {"old": (100, now - 50), "older": (100, now - 90)})  # another process's files
    put(index, "mine", 100)
    assert put(index, "x", 100) == ["older"]
    seen = index.look("old")
    assert index.adopt("old", 100, seen.entry.mtime, seen.ticket, touch=True) == []  # a read: now most recent
    assert put(index, "y", 100) == ["mine"]
    assert put(index, "z", 200) == ["x", "old"]
    assert index.usage() == (300, 2)


def test_victims_are_refused_to_puts_until_reported_removed():
    index = DiskIndex(100)
    put(index, "a", 100)
    ok, victims = index.reserve("b", 100)
    assert ok and victims == ["a"] and index.look("a").removing
    assert index.reserve("a", 10) == (False, []), "a put of a file being unlinked is refused"
    index.removed(victims)
    assert not index.look("a").removing
    index.wrote("b", 100, True, time.time())
    assert index.usage() == (100, 1)


def test_a_delete_during_a_write_removes_the_file_when_the_write_ends():
    index = DiskIndex(1000)
    index.reserve("a", 10)
    assert index.doom(["a"]) == [], "being written: left to the write"
    assert index.wrote("a", 10, True, time.time()), "the write ends: the caller removes the file now"
    assert index.doom(["a"]) == ["a"] and index.usage() == (0, 0)
    index.removed(["a"])
    index.reserve("b", 10)
    assert index.doom(["b"], expired=True) == []  # a TTL sweep does not cancel a write
    assert not index.wrote("b", 10, True, time.time()) and index.usage() == (10, 1)
    sizes = index.sizes()
    assert (sizes["entries"], sizes["writing"], sizes["cancel"], sizes["removing"]) == (1, 0, 0, 0), sizes


def test_a_read_before_a_removal_cannot_bring_the_file_back():
    index = DiskIndex(1000)
    put(index, "a", 10)
    seen = index.look("a")  # a reader starts, then the file is removed
    index.removed(index.doom(["a"]))
    assert index.adopt("a", 10, time.time(), seen.ticket, touch=True) == []
    assert index.usage() == (0, 0)
    fresh = index.look("a")  # a read that began after the removal found the file (another process wrote it)
    index.adopt("a", 10, time.time(), fresh.ticket, touch=True)
    assert index.usage() == (10, 1)


def test_forget_drops_only_the_entry_that_was_read():
    index = DiskIndex(1000)
    put(index, "a", 10)
    stale = index.look("a").entry
    put(index, "a", 20)  # rewritten after the read began
    index.forget("a", stale)
    assert index.usage() == (20, 1), "a file written after the read is not forgotten"
    index.forget("a", index.look("a").entry)
    index.forget("never", None)
    assert index.usage() == (0, 0)


def test_scan_indexes_new_files_and_returns_unlisted_entries_older_than_the_listing():
    index = DiskIndex(1000)
    put(index, "listed", 10)
    put(index, "vanished", 20)
    index.reserve("writing", 30)
    scan = index.scan_begin()
    put(index, "after", 40)  # written while the directory was being listed
    gone = index.scan_found(scan, {"listed": (10, time.time() - 5), "other": (50, time.time() - 5)})
    assert [name for name, _ in gone] == ["vanished"]
    for name, entry in gone:
        index.forget(name, entry)
    assert index.usage() == (10 + 40 + 50 + 30, 3)


def test_scan_ignores_files_removed_since_it_began_and_listings_older_than_clear():
    index = DiskIndex(1000)
    put(index, "a", 10)
    scan = index.scan_begin()
    index.removed(index.doom(["a"]))  # removed after the listing saw it
    assert index.scan_found(scan, {"a": (10, time.time())}) == []
    assert index.usage() == (0, 0)
    scan = index.scan_begin()
    index.clear_end(index.clear_begin())
    assert index.scan_found(scan, {"b": (10, time.time())}) == [], "clear() ran: the listing is out of date"
    assert index.usage() == (0, 0)


def test_clear_takes_only_files_untouched_since_it_began():
    index = DiskIndex(1000)
    for name in ("a", "b", "c", "d"):
        put(index, name, 10)
    before = index.clear_begin()
    put(index, "b", 15)  # rewritten meanwhile
    index.reserve("c", 10)  # being written
    take = index.clear_take("a", before)
    assert take.ok and index.look("a").removing and index.usage() == (55, 4), "indexed until unlinked"
    assert not index.clear_take("b", before).ok and not index.clear_take("c", before).ok
    index.removed(["a"])
    index.forget("a", take.entry)
    index.clear_end(before)  # "d" was not on disk: dropped; "c" is left to its write
    index.wrote("c", 10, True, time.time())
    assert index.usage() == (25, 2)


def test_random_operations_match_a_model_and_bookkeeping_drains():
    """Usage always equals the bytes of the files the index was told of, minus those it evicted or was told
    are gone; it never exceeds the capacity; and the in-flight structures are empty when idle."""
    rng, cap = random.Random(3), 5000
    index, model = DiskIndex(cap), {}
    for step in range(20_000):
        name, op = f"n{rng.randrange(40)}", rng.random()
        if op < 0.4:
            n = rng.randrange(1, 900)
            ok, victims = index.reserve(name, n)
            for v in victims:
                del model[v]
            index.removed(victims)
            if ok:
                wrote = rng.random() < 0.9
                assert not index.wrote(name, n, wrote, time.time())
                if wrote:
                    model[name] = n
        elif op < 0.6:
            seen = index.look(name)
            size = rng.randrange(1, 900)
            victims = index.adopt(name, size, time.time() - rng.random() * 100, seen.ticket, touch=rng.random() < 0.5)
            if seen.entry is None or seen.entry.size != size:
                model[name] = size
            for v in victims:
                del model[v]
            index.removed(victims)
        elif op < 0.75:
            index.forget(name, index.look(name).entry)
            model.pop(name, None)
        elif op < 0.9:
            removing = index.doom([name])
            index.removed(removing)
            model.pop(name, None)
        else:
            victims = index.evict()
            index.removed(victims)
        used, entries = index.usage()
        assert (used, entries) == (sum(model.values()), len(model)), f"step {step}"
        assert used <= cap, f"step {step}: {used} > {cap}"
    index.scan_begin()
    index.scan_begin()
    sizes = index.sizes()
    assert sizes["lru"] <= 2 * sizes["entries"] + LRU_SLACK + 1
    assert (sizes["writing"], sizes["cancel"], sizes["removing"], sizes["removed"]) == (0, 0, 0, 0), sizes
