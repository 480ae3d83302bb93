"""L3: one file per chunk under a local directory, shared by every worker process on the node.

Layout: `<root>/<xx>/<key.name>.lmc`, `xx` the first two hex digits of the chunk hash (256 small
directories). A put writes `.<file>.<pid>.<random>.tmp` in the same directory, fsyncs it by policy and
renames it over the final name, so readers see the old file or the new one, whole. A reader holding an open
file keeps reading it after another process unlinks or replaces it (POSIX), so reads are whole or a miss.
Every file is opened relative to a directory fd with O_NOFOLLOW: no symlink is followed out of the root.

Each process keeps its own index (size, write time, last use) and evicts LRU by its own access order;
files it never touched rank by mtime. A background thread re-scans the directory every `rescan_interval`
seconds (and once at start): it counts other processes' files, drops files they removed, sweeps files older
than `ttl`, removes temp files older than `orphan_grace` (a crashed writer's) and evicts down to the cap.
The cap is therefore approximate across processes: another process's writes count from the next rescan,
and processes evicting at once may remove more than the overage. Within one process it is exact.

fsync policies (config `disk_fsync`): "never" (rename only), "file" (fsync the file before the rename),
"always" (also fsync the directory after it). ENOSPC/EDQUOT on a write stop puts for
`full_backoff` seconds (`writable` is False, `stats.errors["disk_full"]`); other faults count as
`stats.errors["io"]`. No method raises on an I/O fault: it answers a miss or False.
"""

import contextlib
import errno
import heapq
import logging
import os
import re
import stat
import threading
import time
from collections import Counter
from collections.abc import Sequence

from ..errors import TierUnavailableError
from ..keys import ChunkKey
from .base import Tier, TierUsage

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("never", "file", "always")  # the names of config.disk_fsync
_SUFFIX = ".lmc"
_CHUNK_RE = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{2})[0-9a-f]{30}\.lmc$")
_TMP_RE = re.compile(r"^\..+\.tmp$")
_SUBDIR_RE = re.compile(r"^[0-9a-f]{2}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_all(fd: int, data) -> None:
    """Write every byte (os.write may write less than asked). Tests patch this to inject ENOSPC."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read(dfd: int, fname: str) -> tuple[bytes, float]:
    """The whole file in one read where the OS allows (never more than its real size), and its mtime."""
    fd = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", fname)
        parts, left = [], st.st_size
        while left > 0 and (part := os.read(fd, left)):
            parts.append(part)
            left -= len(part)
        return (parts[0] if len(parts) == 1 else b"".join(parts)), st.st_mtime
    finally:
        os.close(fd)


class _Entry:
    __slots__ = ("size", "mtime", "stamp", "seen")

    def __init__(self, size: int, mtime: float, stamp: float):
        self.size, self.mtime, self.stamp, self.seen = size, mtime, stamp, time.monotonic()


class DiskTier(Tier[bytes]):
    """Chunk files under `path`, at most `capacity` bytes. `ttl` (0 = off) is swept every `sweep_interval`
    seconds; other processes' writes are counted every `rescan_interval` seconds; a full disk stops
    writes for `full_backoff` seconds; temp files older than `orphan_grace` seconds are removed."""

    def __init__(self, path: str, capacity: int, *, fsync: str = "never", ttl: float = 0.0,
                 sweep_interval: float = 60.0, rescan_interval: float = 10.0, full_backoff: float = 30.0,
                 orphan_grace: float = 60.0, name: str = "L3"):
        super().__init__()
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"DiskTier fsync: expected one of {FSYNC_POLICIES}, got {fsync!r}")
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"DiskTier capacity: expected a positive number of bytes, got {capacity!r}")
        for arg, v, low in (("ttl", ttl, 0), ("full_backoff", full_backoff, 0), ("orphan_grace", orphan_grace, 0),
                            ("sweep_interval", sweep_interval, 1e-3), ("rescan_interval", rescan_interval, 1e-3)):
            if not v >= low:
                raise ValueError(f"DiskTier {arg}: expected seconds >= {low}, got {v!r}")
        self.name, self.root, self.capacity, self.ttl = name, os.path.abspath(path), capacity, ttl
        self.full_backoff, self.orphan_grace = full_backoff, orphan_grace
        self._fsync_file, self._fsync_dir = fsync != "never", fsync == "always"
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, str]] = []  # (stamp, name) in LRU order; stale items skipped lazily
        self._used = self._reserved = 0  # bytes of indexed files; bytes of puts in flight
        self._writing: Counter = Counter()  # names this process is writing now
        self._cancel: set[str] = set()  # names deleted while being written: removed when the write ends
        self._doomed: set[str] = set()  # names this process is unlinking now
        self._removed: dict[str, int] = {}  # name -> removal number, for names removed since the last scan
        self._seq = self._scan_seq = self._epoch = 0  # removals so far; at the last scan; clear() calls
        self._last_stamp = self._full_until = 0.0
        self._lock, self._scan_lock, self._stop = threading.Lock(), threading.Lock(), threading.Event()
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise TierUnavailableError(f"DiskTier: cannot create local_cache_dir {self.root!r}: {e}") from e
        self._scan()
        interval = min(rescan_interval, sweep_interval) if ttl > 0 else rescan_interval
        self._thread = threading.Thread(target=self._maintain, args=(interval,), daemon=True,
                                        name=f"lmcache-disk-{name}")
        self._thread.start()

    @property
    def writable(self) -> bool:
        """False during the back-off after a disk-full error."""
        return time.monotonic() >= self._full_until

    # -- Tier interface ---------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = []
        for name in (k.name for k in keys):
            with self._lock:
                e, seq = self._entries.get(name), self._seq
                if e is not None or name in self._doomed:
                    out.append(e is not None and not self._expired(e.mtime))
                    continue
            try:  # not indexed: another process may have written it since our last scan
                st = self._stat(name)
            except OSError as err:
                self._fault(err)
                out.append(False)
                continue
            out.append(stat.S_ISREG(st.st_mode) and not self._expired(st.st_mtime))
            if out[-1]:
                self._adopt(name, st.st_size, st.st_mtime, seq, touch=False)
        return out

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Each chunk's whole file, unverified (the engine verifies), or None."""
        out = []
        for name in (k.name for k in keys):
            with self._lock:
                doomed, e, seq = name in self._doomed, self._entries.get(name), self._seq
            data = None
            if not doomed:  # also when not indexed: another process may have written it
                try:
                    data, mtime = self._in_dir(name[33:35], lambda dfd: _read(dfd, name + _SUFFIX))
                except OSError as err:
                    self._fault(err)
                    with self._lock:
                        if e is not None and self._entries.get(name) is e:  # gone, and no put since
                            self._drop(name)
                if data is not None and self._expired(mtime):
                    data = None
                    self._discard([name], evicted=True)
            with self._lock:
                self.stats.misses += data is None
                self.stats.hits += data is not None
                self.stats.bytes_read += len(data or b"")
            if data is not None:
                self._adopt(name, len(data), mtime, seq, touch=True)
            out.append(data)
        return out

    def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> list[bool]:
        """Write each value whole (temp file, rename); False when refused (too big, disk full) or failed."""
        return [self._put_one(key.name, value) for key, value in items]

    def _put_one(self, name: str, value: bytes) -> bool:
        n = len(value)
        with self._lock:
            if not self.writable or n > self.capacity or name in self._doomed:
                return False
            victims = self._make_room(n)
            fits = self._used + self._reserved + n <= self.capacity
            if fits:  # reserved: counted before it is written, so the cap holds while writes are in flight
                self._reserved += n
                self._writing[name] += 1
        self._unlink_doomed(victims)
        if not fits:
            return False
        try:
            self._in_dir(name[33:35], lambda dfd: self._write(dfd, name + _SUFFIX, value), create=True)
            ok = True
        except OSError as err:
            self._fault(err)
            ok = False
        with self._lock:
            self._reserved -= n
            self._writing[name] -= 1
            if ok:
                self._set(name, n, time.time(), self._next_stamp())
                self.stats.bytes_written += n
            cancelled = self._writing[name] == 0 and name in self._cancel
            if self._writing[name] == 0:
                del self._writing[name]
                self._cancel.discard(name)
        if cancelled:  # delete() was called while this write was in flight
            self._discard([name])
        return ok

    def _write(self, dfd: int, fname: str, value: bytes) -> None:
        tmp = f".{fname}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                _write_all(fd, value)
                if self._fsync_file:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, fname, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        if self._fsync_dir:
            os.fsync(dfd)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Unlink each key's file, also one this process never indexed (another process wrote it)."""
        self._discard([k.name for k in keys])

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used + self._reserved, self.capacity, len(self._entries))

    def clear(self) -> None:
        """Remove every chunk file and temp file under the root (other files are left alone).

        Each file leaves the index only once it is unlinked: writes racing with clear() never get room that
        the disk does not have yet (forgetting the index first let the directory reach twice the cap)."""
        with self._lock:
            before, self._epoch = dict(self._entries), self._epoch + 1
        try:
            listing = self._walk()
        except OSError as err:
            self._fault(err)
            return
        for sub, entry in listing:
            if _TMP_RE.match(entry.name):
                self._unlink(sub, entry.name)
            elif _CHUNK_RE.match(entry.name):
                name = entry.name[: -len(_SUFFIX)]
                with self._lock:
                    e = self._entries.get(name)
                    rewritten = e is not None and e is not before.get(name)
                    if rewritten or name in self._writing or name in self._doomed:
                        continue  # written since clear() began, or being removed by another call
                    self._doomed.add(name)  # no put of this name until it is gone
                self._unlink(sub, entry.name)
                with self._lock:
                    self._doomed.discard(name)
                    if e is not None and self._entries.get(name) is e:
                        self._drop(name)
                    self._seq += 1
                    self._removed[name] = self._seq
        with self._lock:  # indexed files that were gone already
            for name, e in before.items():
                if self._entries.get(name) is e:
                    self._drop(name)

    def close(self) -> None:
        """Stop the maintenance thread (idempotent). The tier stays usable, without rescans or sweeps."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # -- index (the _lock held) -------------------------------------------------------------------------

    def _next_stamp(self) -> float:
        self._last_stamp = max(time.time(), self._last_stamp + 1e-6)  # strictly increasing: access order
        return self._last_stamp

    def _set(self, name: str, size: int, mtime: float, stamp: float) -> None:
        self._drop(name)
        self._entries[name] = _Entry(size, mtime, stamp)
        self._used += size
        self._push(stamp, name)

    def _push(self, stamp: float, name: str) -> None:
        heapq.heappush(self._heap, (stamp, name))
        if len(self._heap) > 2 * len(self._entries) + 1024:  # rebuild without stale items
            self._heap = [(e.stamp, n) for n, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _drop(self, name: str) -> None:
        e = self._entries.pop(name, None)
        self._used -= e.size if e is not None else 0

    def _make_room(self, n: int) -> list[str]:
        """Pop LRU victims until `n` more bytes fit; returns them doomed (`_unlink_doomed` them)."""
        victims, busy = [], []
        while self._used + self._reserved + n > self.capacity and self._heap:
            stamp, name = heapq.heappop(self._heap)
            e = self._entries.get(name)
            if e is None or e.stamp != stamp:
                continue
            if name in self._writing:  # being replaced by this process: not a victim now
                busy.append((stamp, name))
                continue
            self._drop(name)
            victims.append(name)
        for item in busy:
            heapq.heappush(self._heap, item)
        self.stats.evictions += len(victims)
        self._doomed.update(victims)
        return victims

    def _expired(self, mtime: float) -> bool:
        return self.ttl > 0 and time.time() - mtime > self.ttl

    # -- index updates that take the lock; file removal --------------------------------------------------

    def _adopt(self, name: str, size: int, mtime: float, seq: int, *, touch: bool) -> None:
        """Record a file found on disk (read or stat'ed after removal number `seq`); evict if over the cap."""
        with self._lock:
            e = self._entries.get(name)
            if name in self._doomed or name in self._writing or (e is None and self._removed.get(name, 0) > seq):
                return  # this process is writing or removed it meanwhile: that call keeps the index right
            if e is not None and e.size == size and e.mtime >= mtime:
                if touch:
                    e.stamp = self._next_stamp()
                    self._push(e.stamp, name)
                return
            self._set(name, size, mtime, self._next_stamp() if touch else max(mtime, e.stamp if e else mtime))
            victims = self._make_room(0)
        self._unlink_doomed(victims)

    def _discard(self, names: list[str], evicted: bool = False) -> None:
        """Remove files; one this process is writing now goes when that write ends (unless TTL-expired)."""
        with self._lock:
            busy = [n for n in names if n in self._writing]
            if not evicted:
                self._cancel.update(busy)
            names = [n for n in names if n not in busy and n not in self._doomed]
            for name in names:
                self._drop(name)
            self.stats.evictions += len(names) if evicted else 0
            self._doomed.update(names)
        self._unlink_doomed(names)

    def _unlink_doomed(self, names: list[str]) -> None:
        for name in names:
            self._unlink(name[33:35], name + _SUFFIX)
        with self._lock:
            self._doomed.difference_update(names)
            for name in names:
                self._seq += 1
                self._removed[name] = self._seq

    def _unlink(self, sub: str, fname: str) -> None:
        try:
            self._in_dir(sub, lambda dfd: os.unlink(fname, dir_fd=dfd))
        except OSError as err:
            self._fault(err)

    # -- file system ------------------------------------------------------------------------------------

    def _in_dir(self, sub: str, op, *, create: bool = False):
        """op(dir_fd) in fan-out directory `sub`, opened without following a symlink."""
        path = os.path.join(self.root, sub)
        try:
            dfd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
            os.makedirs(path, mode=0o700, exist_ok=True)
            dfd = os.open(path, _DIR_FLAGS)
        try:
            return op(dfd)
        finally:
            os.close(dfd)

    def _stat(self, name: str) -> os.stat_result:
        return self._in_dir(name[33:35], lambda dfd: os.stat(name + _SUFFIX, dir_fd=dfd, follow_symlinks=False))

    def _gone(self, name: str) -> bool:
        try:
            self._stat(name)
        except FileNotFoundError:
            return True
        except OSError:
            pass  # unknown: keep the entry
        return False

    def _fault(self, err: OSError) -> None:
        if isinstance(err, FileNotFoundError):
            return  # removed by another process or a sweep: a plain miss
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        with self._lock:
            self.stats.errors["disk_full" if full else "io"] += 1
            self._full_until = time.monotonic() + self.full_backoff if full else self._full_until
        log.warning("%s: %s under %s: %s%s", self.name, "disk full" if full else "I/O error", self.root, err,
                    f"; no writes for {self.full_backoff:.0f} s" if full else "")

    def _walk(self) -> list:
        """(subdir, DirEntry) of every regular file in the fan-out directories; symlinks are skipped."""
        with os.scandir(self.root) as top:
            subs = [d.name for d in top if _SUBDIR_RE.match(d.name) and d.is_dir(follow_symlinks=False)]
        files = []
        for sub in subs:
            with contextlib.suppress(FileNotFoundError), os.scandir(os.path.join(self.root, sub)) as it:
                files += [(sub, e) for e in it if e.is_file(follow_symlinks=False)]
        return files

    # -- rescan, TTL sweep, orphan removal ----------------------------------------------------------------

    def _maintain(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._scan()
            except Exception:  # the thread must outlive any surprise; the next pass retries
                log.exception("%s: directory scan failed", self.name)

    def _scan(self) -> None:
        with self._scan_lock:
            began, now = time.monotonic(), time.time()
            with self._lock:
                self._removed = {n: s for n, s in self._removed.items() if s > self._scan_seq}
                seq, self._scan_seq, epoch = self._seq, self._seq, self._epoch
            try:
                listing = self._walk()
            except OSError as err:  # keep the index as it is; the next pass retries
                self._fault(err)
                return
            found, expired = {}, []
            for sub, entry in listing:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                match = _CHUNK_RE.match(entry.name)
                if match and match.group(2) == sub:
                    name = entry.name[: -len(_SUFFIX)]
                    if self._expired(st.st_mtime):
                        expired.append(name)
                    else:
                        found[name] = (st.st_size, st.st_mtime)
                elif _TMP_RE.match(entry.name) and now - st.st_mtime > self.orphan_grace:
                    self._unlink(sub, entry.name)  # left by a crashed writer
            self._discard(expired, evicted=True)
            with self._lock:
                if self._epoch != epoch:
                    return  # clear() ran meanwhile: this listing is out of date
                for name, (size, mtime) in found.items():
                    e = self._entries.get(name)
                    if name in self._doomed or name in self._writing or self._removed.get(name, 0) > seq:
                        continue
                    if e is None or e.size != size or e.mtime < mtime:
                        self._set(name, size, mtime, mtime if e is None else max(e.stamp, mtime))
                gone = [(n, e) for n, e in self._entries.items()
                        if n not in found and e.seen < began and n not in self._writing]
            # a listing may miss a file renamed over while it ran (POSIX leaves that open): stat to be sure
            gone = [(n, e) for n, e in gone if self._gone(n)]
            with self._lock:
                for name, e in gone:
                    if self._entries.get(name) is e:
                        self._drop(name)  # removed by another process
                victims = self._make_room(0)
            self._unlink_doomed(victims)
