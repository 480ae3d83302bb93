"""L3's per-process index: the chunk files this process knows of, their sizes and its LRU order. No I/O.

The tier does the file operations and reports each one here. `used` (bytes of indexed files plus puts in
flight) never exceeds `capacity`: a put reserves its bytes first and is refused when eviction cannot make
room. Every method is atomic (one lock, never held across I/O), so reads, writes, removals and the rescan
thread may call at once. The protocol, per operation:

    put      ok, victims = reserve(name, n); unlink victims, removed(victims); write if ok;
             if wrote(name, n, ok, mtime): the file was deleted meanwhile: remove it now (below)
    read     seen = look(name); read or stat the file; then adopt(name, size, mtime, seen.ticket, touch=...)
             when it was there, forget(name, seen.entry) when it was not
    remove   names = doom(names); unlink them; removed(names)
    rescan   scan = scan_begin(); list the directory; gone = scan_found(scan, found); forget the entries of
             `gone` whose file is really absent; unlink evict() and report removed()
    clear    before = clear_begin(); per file: take = clear_take(name, before), unlink, removed([name]),
             forget(name, take.entry); then clear_end(before)

Races it settles: a name being written is never evicted, adopted from a stale stat or called gone; a delete
during a write removes the file when the write ends; no put of a name is allowed while it is being unlinked;
a read, stat or listing that began before a removal never brings the removed name back (tickets); a
listing that began before clear() is dropped (epochs).
"""

import heapq
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

LRU_SLACK = 1024  # stale LRU items allowed beyond 2 x entries before the heap is rebuilt


@dataclass
class Entry:
    size: int
    mtime: float  # the file's modification time (wall clock) when indexed
    stamp: float  # LRU rank: larger is more recent (files never used here rank by mtime)
    seen: float = field(default_factory=time.monotonic)  # when indexed: an older listing cannot call it gone


class Look(NamedTuple):
    entry: Entry | None  # None: not indexed
    removing: bool  # being unlinked by this process now: a miss
    ticket: int  # pass to adopt(): removals after it win


class Scan(NamedTuple):
    ticket: int
    epoch: int
    began: float  # time.monotonic()


class Take(NamedTuple):
    ok: bool  # clear() may unlink the file now
    entry: Entry | None


class DiskIndex:
    def __init__(self, capacity: int):
        self.capacity = capacity  # bytes, > 0 (DiskTier checks what the user gave)
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._lru: list[tuple[float, str]] = []  # (stamp, name); stale items are skipped lazily
        self._used = self._reserved = 0  # bytes of indexed files; bytes of puts in flight
        self._writing: Counter = Counter()  # name -> puts of it in flight
        self._cancel: set[str] = set()  # deleted while being written: removed when the last write ends
        self._removing: set[str] = set()  # being unlinked now
        self._removed: dict[str, int] = {}  # name -> ticket of its removal, for removals since the last scan
        self._ticket = self._scan_ticket = self._epoch = 0  # removals so far; at the last scan; clear() calls
        self._last_stamp = 0.0

    # -- reading ----------------------------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(bytes of indexed files plus puts in flight, indexed files)."""
        with self._lock:
            return self._used + self._reserved, len(self._entries)

    def sizes(self) -> dict[str, int]:
        """How many items each structure holds, for leak checks: `entries`; `lru` (at most 2 x the most
        entries held since its last rebuild + LRU_SLACK); `writing`, `cancel`, `removing` (operations in
        flight: 0 when idle); `removed` (names removed since the last scan: 0 after two idle scans)."""
        with self._lock:
            return {"entries": len(self._entries), "lru": len(self._lru), "writing": len(self._writing),
                    "cancel": len(self._cancel), "removing": len(self._removing), "removed": len(self._removed)}

    def look(self, name: str) -> Look:
        with self._lock:
            return Look(self._entries.get(name), name in self._removing, self._ticket)

    # -- puts -------------------------------------------------------------------------------------------

    def reserve(self, name: str, n: int) -> tuple[bool, list[str]]:
        """Count `n` bytes of a put of `name` before it is written (refused while `name` is being unlinked
        or when it cannot fit); victims: files evicted to make room, to unlink whether or not it fits."""
        with self._lock:
            if name in self._removing or n > self.capacity:
                return False, []
            victims = self._make_room(n)
            ok = self._used + self._reserved + n <= self.capacity
            if ok:
                self._reserved += n
                self._writing[name] += 1
            return ok, victims

    def wrote(self, name: str, n: int, ok: bool, mtime: float) -> bool:
        """A reserved put ended (ok: the file is in place). True when it was deleted meanwhile and this was
        its last write in flight: the caller removes the file now."""
        with self._lock:
            self._reserved -= n
            self._writing[name] -= 1
            if ok:
                self._set(name, n, mtime, self._next_stamp())
            if self._writing[name]:
                return False
            del self._writing[name]
            cancelled = name in self._cancel
            self._cancel.discard(name)
            return cancelled

    # -- files found on disk, files found gone ----------------------------------------------------------

    def adopt(self, name: str, size: int, mtime: float, ticket: int, *, touch: bool) -> list[str]:
        """Index a file found by a read (touch: a use, it becomes the most recent) or a stat that began at
        `ticket`; returns the files to evict if it pushed the index over capacity."""
        with self._lock:
            e = self._entries.get(name)
            if name in self._removing or name in self._writing or (e is None and self._removed.get(name, 0) > ticket):
                return []  # removed or being written meanwhile: that call keeps the index right
            if e is not None and e.size == size and e.mtime >= mtime:
                if touch:
                    e.stamp = self._next_stamp()
                    self._push(e.stamp, name)
                return []
            self._set(name, size, mtime, self._next_stamp() if touch else max(mtime, e.stamp if e else mtime))
            return self._make_room(0)

    def forget(self, name: str, entry: Entry | None) -> None:
        """`entry`'s file was found gone: drop it, unless `name` was indexed anew since."""
        with self._lock:
            if entry is not None and self._entries.get(name) is entry:
                self._drop(name)

    def evict(self) -> list[str]:
        """Files to evict (least recently used first) until the index fits its capacity."""
        with self._lock:
            return self._make_room(0)

    # -- removals ---------------------------------------------------------------------------------------

    def doom(self, names: Iterable[str], *, expired: bool = False) -> list[str]:
        """Drop `names` from the index to be unlinked now (report them to `removed` after). A name being
        written is left to its write, which removes it when it ends (expired: not removed); a name being
        unlinked already is skipped."""
        with self._lock:
            names = [n for n in names if n not in self._removing]
            busy = [n for n in names if n in self._writing]
            if not expired:
                self._cancel.update(busy)
            names = [n for n in names if n not in self._writing]
            for name in names:
                self._drop(name)
            self._removing.update(names)
            return names

    def removed(self, names: Iterable[str]) -> None:
        """`names` were unlinked (or were gone): puts of them may go ahead again."""
        with self._lock:
            for name in names:
                self._removing.discard(name)
                self._ticket += 1
                self._removed[name] = self._ticket

    # -- rescan -----------------------------------------------------------------------------------------

    def scan_begin(self) -> Scan:
        """Before listing the directory. Forgets removals older than the previous scan."""
        with self._lock:
            self._removed = {n: t for n, t in self._removed.items() if t > self._scan_ticket}
            self._scan_ticket = self._ticket
            return Scan(self._ticket, self._epoch, time.monotonic())

    def scan_found(self, scan: Scan, found: dict[str, tuple[int, float]]) -> list[tuple[str, Entry]]:
        """Index the listing's chunk files (name -> (size, mtime)); returns the indexed entries it did not
        show, which may be gone (a listing can miss a file renamed over while it ran: stat them, then
        `forget` the gone ones). Nothing when clear() ran meanwhile: the listing is out of date."""
        with self._lock:
            if self._epoch != scan.epoch:
                return []
            for name, (size, mtime) in found.items():
                e = self._entries.get(name)
                if name in self._removing or name in self._writing or self._removed.get(name, 0) > scan.ticket:
                    continue
                if e is None or e.size != size or e.mtime < mtime:
                    self._set(name, size, mtime, mtime if e is None else max(e.stamp, mtime))
            return [(n, e) for n, e in self._entries.items()
                    if n not in found and e.seen < scan.began and n not in self._writing]

    # -- clear ------------------------------------------------------------------------------------------

    def clear_begin(self) -> dict[str, Entry]:
        """The entries as clear() begins (pass to clear_take and clear_end); scans under way are dropped."""
        with self._lock:
            self._epoch += 1
            return dict(self._entries)

    def clear_take(self, name: str, before: dict[str, Entry]) -> Take:
        """Whether clear() may unlink `name` now: not when it was written since clear() began or is being
        written or removed. It stays indexed until unlinked, so writes racing clear() never get room the disk
        does not have yet; after unlinking, report `removed([name])` and `forget(name, take.entry)`."""
        with self._lock:
            e = self._entries.get(name)
            if (e is not None and e is not before.get(name)) or name in self._writing or name in self._removing:
                return Take(False, None)
            self._removing.add(name)
            return Take(True, e)

    def clear_end(self, before: dict[str, Entry]) -> None:
        """Drop what clear() did not find on disk and nobody rewrote since it began."""
        with self._lock:
            for name, e in before.items():
                if self._entries.get(name) is e:
                    self._drop(name)

    # -- internals (the lock held) ----------------------------------------------------------------------

    def _next_stamp(self) -> float:
        self._last_stamp = max(time.time(), self._last_stamp + 1e-6)  # strictly increasing: access order
        return self._last_stamp

    def _set(self, name: str, size: int, mtime: float, stamp: float) -> None:
        self._drop(name)
        self._entries[name] = Entry(size, mtime, stamp)
        self._used += size
        self._push(stamp, name)

    def _push(self, stamp: float, name: str) -> None:
        heapq.heappush(self._lru, (stamp, name))
        if len(self._lru) > 2 * len(self._entries) + LRU_SLACK:  # rebuild without stale items
            self._lru = [(e.stamp, n) for n, e in self._entries.items()]
            heapq.heapify(self._lru)

    def _drop(self, name: str) -> None:
        e = self._entries.pop(name, None)
        self._used -= e.size if e is not None else 0

    def _make_room(self, n: int) -> list[str]:
        """Pop LRU victims until `n` more bytes fit; they are returned marked as being removed."""
        victims, busy = [], []
        while self._used + self._reserved + n > self.capacity and self._lru:
            stamp, name = heapq.heappop(self._lru)
            e = self._entries.get(name)
            if e is None or e.stamp != stamp:
                continue
            if name in self._writing:  # being replaced by this process: not a victim now
                busy.append((stamp, name))
                continue
            self._drop(name)
            victims.append(name)
        for item in busy:
            heapq.heappush(self._lru, item)
        self._removing.update(victims)
        return victims
