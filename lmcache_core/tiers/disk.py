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
"always" or "dir" (also fsync the directory after it). ENOSPC/EDQUOT on a write stop puts for
`full_backoff` seconds (`writable` is False, `stats.errors["disk_full"]`); other faults count as
`stats.errors["io"]`. No method raises on an I/O fault: it answers a miss or False.
"""

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

FSYNC_POLICIES = ("never", "file", "always", "dir")
_SUFFIX = ".lmc"
_CHUNK_RE = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{2})[0-9a-f]{30}\.lmc$")
_TMP_RE = re.compile(r"^\..+\.tmp$")
_SUBDIR_RE = re.compile(r"^[0-9a-f]{2}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_all(fd: int, data) -> None:
    """Write every byte (os.write may write less than asked). Tests patch this to inject ENOSPC."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Entry:
    __slots__ = ("size", "mtime", "stamp", "seen")

    def __init__(self, size: int, mtime: float, stamp: float):
        self.size, self.mtime, self.stamp, self.seen = size, mtime, stamp, time.monotonic()


class DiskTier(Tier[bytes]):
    def __init__(self, path: str, capacity: int, *, fsync: str = "never", ttl: float = 0.0,
                 sweep_interval: float = 60.0, rescan_interval: float = 10.0, full_backoff: float = 30.0,
                 orphan_grace: float = 60.0, name: str = "L3"):
        super().__init__()
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"DiskTier fsync: expected one of {FSYNC_POLICIES}, got {fsync!r}")
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"DiskTier capacity: expected a positive number of bytes, got {capacity!r}")
        for arg, value in (("ttl", ttl), ("full_backoff", full_backoff), ("orphan_grace", orphan_grace)):
            if value < 0:
                raise ValueError(f"DiskTier {arg}: expected seconds >= 0, got {value!r}")
        for arg, value in (("sweep_interval", sweep_interval), ("rescan_interval", rescan_interval)):
            if value <= 0:
                raise ValueError(f"DiskTier {arg}: expected seconds > 0, got {value!r}")
        self.name, self.root, self.capacity, self.ttl = name, os.path.abspath(path), capacity, ttl
        self.full_backoff, self.orphan_grace = full_backoff, orphan_grace
        self._fsync_file, self._fsync_dir = fsync != "never", fsync in ("always", "dir")
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, str]] = []  # (stamp, name), stale items skipped lazily
        self._used = self._reserved = 0
        self._writing: Counter = Counter()  # names this process is writing now
        self._doomed: set[str] = set()  # names this process is unlinking now
        self._removed: set[str] = set()  # names removed since the current scan began
        self._epoch, self._last_stamp, self._full_until = 0, 0.0, 0.0
        self._lock, self._scan_lock, self._stop = threading.Lock(), threading.Lock(), threading.Event()
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        except OSError as e:
            raise TierUnavailableError(f"DiskTier: cannot create local_cache_dir {self.root!r}: {e}") from e
        self._scan(start=True)
        interval = min(rescan_interval, sweep_interval) if ttl > 0 else rescan_interval
        self._thread = threading.Thread(target=self._maintain, args=(interval,), daemon=True,
                                        name=f"lmcache-disk-{name}")
        self._thread.start()

    @property
    def writable(self) -> bool:
        """False during the back-off after a disk-full error."""
        return time.monotonic() >= self._full_until

    # -- reads ------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        out = []
        for key in keys:
            name = key.name
            with self._lock:
                e = self._entries.get(name)
                if name in self._doomed or e is not None:
                    out.append(e is not None and not self._expired(e.mtime))
                    continue
            try:  # another process may have written it since our last scan
                st = self._in_dir(name, lambda dfd: os.stat(name + _SUFFIX, dir_fd=dfd, follow_symlinks=False))
            except OSError as err:
                self._fault(err)
                out.append(False)
                continue
            found = stat.S_ISREG(st.st_mode) and not self._expired(st.st_mtime)
            if found:
                self._adopt(name, st.st_size, st.st_mtime, touch=False)
            out.append(found)
        return out

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Each chunk's whole file, unverified (the engine verifies), or None."""
        out = []
        for key in keys:
            name = key.name
            with self._lock:
                doomed, e = name in self._doomed, self._entries.get(name)
            data = None
            if not doomed:  # not indexed: another process may have written it, so look anyway
                try:
                    data, mtime = self._in_dir(name, lambda dfd: self._read(dfd, name + _SUFFIX))
                except OSError as err:
                    self._fault(err)
                    if isinstance(err, FileNotFoundError) and e is not None:
                        self._forget(name, e)
                if data is not None and self._expired(mtime):
                    data = None
                    self._expire([name])
            with self._lock:
                if data is None:
                    self.stats.misses += 1
                else:
                    self.stats.hits += 1
                    self.stats.bytes_read += len(data)
            if data is not None:
                self._adopt(name, len(data), mtime, touch=True)
            out.append(data)
        return out

    @staticmethod
    def _read(dfd: int, fname: str) -> tuple[bytes, float]:
        fd = os.open(fname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", fname)
            parts, left = [], st.st_size  # never more than the file's real size
            while left > 0:
                part = os.read(fd, left)
                if not part:
                    break
                parts.append(part)
                left -= len(part)
            return (parts[0] if len(parts) == 1 else b"".join(parts)), st.st_mtime
        finally:
            os.close(fd)

    # -- writes -----------------------------------------------------------------------------------------

    def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> list[bool]:
        return [self._put_one(key.name, value) for key, value in items]

    def _put_one(self, name: str, value: bytes) -> bool:
        n = len(value)
        with self._lock:
            if not self.writable or n > self.capacity or name in self._doomed:
                return False
            victims = self._make_room(n)
            fits = self._used + self._reserved + n <= self.capacity
            if fits:
                self._reserved += n
                self._writing[name] += 1
        self._remove(victims)
        if not fits:
            return False
        try:
            self._in_dir(name, lambda dfd: self._write(dfd, name + _SUFFIX, value), create=True)
            ok = True
        except OSError as err:
            self._fault(err)
            ok = False
        with self._lock:
            self._reserved -= n
            self._writing[name] -= 1
            if not self._writing[name]:
                del self._writing[name]
            if ok:
                self._set(name, n, time.time(), self._next_stamp())
                self.stats.bytes_written += n
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
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        if self._fsync_dir:
            os.fsync(dfd)

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Unlink each key's file, also one this process never indexed (another process wrote it)."""
        with self._lock:
            for key in keys:
                self._drop(key.name)
        self._remove(self._doom([k.name for k in keys]))

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used + self._reserved, self.capacity, len(self._entries))

    def clear(self) -> None:
        """Remove every chunk file and temp file under the root (other files are left alone)."""
        with self._lock:
            self._entries.clear()
            self._heap.clear()
            self._used, self._epoch = 0, self._epoch + 1
        try:
            listing = self._walk()
        except OSError as err:
            self._fault(err)
            return
        for sub, entry in listing:
            if _CHUNK_RE.match(entry.name) or _TMP_RE.match(entry.name):
                self._unlink(sub, entry.name)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # -- index (call with self._lock held) -------------------------------------------------------------

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
        if len(self._heap) > 2 * len(self._entries) + 1024:  # drop stale heap items
            self._heap = [(e.stamp, n) for n, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _drop(self, name: str) -> None:
        e = self._entries.pop(name, None)
        if e is not None:
            self._used -= e.size

    def _make_room(self, n: int) -> list[str]:
        """Pop LRU victims until `n` more bytes fit; returns them doomed (unlink with `_remove`)."""
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
            self.stats.evictions += 1
        for item in busy:
            heapq.heappush(self._heap, item)
        self._doomed.update(victims)
        return victims

    def _expired(self, mtime: float) -> bool:
        return self.ttl > 0 and time.time() - mtime > self.ttl

    # -- index updates that take the lock, file removal ---------------------------------------------------

    def _adopt(self, name: str, size: int, mtime: float, *, touch: bool) -> None:
        """Record a file found on disk (read or stat'ed); evict if that puts this view over the cap."""
        with self._lock:
            e = self._entries.get(name)
            if name in self._doomed or name in self._writing or (e is None and name in self._removed):
                return  # this process is writing or removing it: that call keeps the index right
            if e is not None and e.size == size and e.mtime >= mtime:
                if touch:
                    e.stamp = self._next_stamp()
                    self._push(e.stamp, name)
                return
            stamp = self._next_stamp() if touch else max(mtime, e.stamp if e else mtime)
            self._set(name, size, mtime, stamp)
            victims = self._make_room(0)
        self._remove(victims)

    def _forget(self, name: str, e: _Entry) -> None:
        with self._lock:
            if self._entries.get(name) is e:  # not replaced by a put meanwhile
                self._drop(name)

    def _doom(self, names: list[str]) -> list[str]:
        with self._lock:
            self._doomed.update(names)
            return names

    def _expire(self, names: list[str]) -> None:
        """Remove files older than the TTL (counted as evictions), except ones this process is writing."""
        with self._lock:
            stale = [n for n in names if n not in self._writing and n not in self._doomed]
            for name in stale:
                self._drop(name)
            self.stats.evictions += len(stale)
            self._doomed.update(stale)
        self._remove(stale)

    def _remove(self, names: list[str]) -> None:
        """Unlink doomed chunk files (outside the lock), then let the names be used again."""
        for name in names:
            self._unlink(name[33:35], name + _SUFFIX)
        with self._lock:
            self._doomed.difference_update(names)
            self._removed.update(names)

    def _unlink(self, sub: str, fname: str) -> None:
        try:
            self._in_dir(sub, lambda dfd: os.unlink(fname, dir_fd=dfd), is_sub=True)
        except FileNotFoundError:
            pass
        except OSError as err:
            self._fault(err)

    # -- file system helpers --------------------------------------------------------------------------

    def _in_dir(self, name: str, op, *, create: bool = False, is_sub: bool = False):
        """Run op(dir_fd) in the fan-out directory of chunk `name` (or subdirectory `name`), no symlinks."""
        path = os.path.join(self.root, name if is_sub else name[33:35])
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

    def _fault(self, err: OSError) -> None:
        if isinstance(err, FileNotFoundError):
            return  # a file removed by another process or by a TTL sweep: a plain miss
        with self._lock:
            if err.errno in _FULL:
                self.stats.errors["disk_full"] += 1
                self._full_until = time.monotonic() + self.full_backoff
            else:
                self.stats.errors["io"] += 1
        if err.errno in _FULL:
            log.warning("%s: disk full under %s (%s); no writes for %.0f s", self.name, self.root, err,
                        self.full_backoff)
        else:
            log.warning("%s: I/O error under %s: %s", self.name, self.root, err)

    def _walk(self) -> list:
        """(subdir, DirEntry) of every regular file in the fan-out directories; symlinks are skipped."""
        with os.scandir(self.root) as top:
            subs = [d.name for d in top if _SUBDIR_RE.match(d.name) and d.is_dir(follow_symlinks=False)]
        files = []
        for sub in subs:
            try:
                with os.scandir(os.path.join(self.root, sub)) as it:
                    files += [(sub, e) for e in it if e.is_file(follow_symlinks=False)]
            except FileNotFoundError:
                continue
        return files

    # -- rescan, TTL sweep, orphan removal ------------------------------------------------------------

    def _maintain(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._scan()
            except Exception:  # the thread must outlive any surprise; the next pass retries
                log.exception("%s: directory scan failed", self.name)

    def _scan(self, start: bool = False) -> None:
        with self._scan_lock:
            began = time.monotonic()
            with self._lock:
                self._removed, epoch = set(), self._epoch
            found, expired, now = {}, {}, time.time()
            try:
                listing = self._walk()
            except OSError as err:  # keep the index as it is; the next pass retries
                self._fault(err)
                return
            for sub, entry in listing:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                match = _CHUNK_RE.match(entry.name)
                if match and match.group(2) == sub:
                    name = entry.name[: -len(_SUFFIX)]
                    (expired if self._expired(st.st_mtime) else found)[name] = (st.st_size, st.st_mtime)
                elif _TMP_RE.match(entry.name) and now - st.st_mtime > self.orphan_grace:
                    self._unlink(sub, entry.name)  # a crashed writer's temp file
            self._expire(list(expired))
            with self._lock:
                if self._epoch != epoch:
                    return  # clear() ran meanwhile: this listing is out of date
                skip = self._doomed | self._removed | set(self._writing)
                for name, (size, mtime) in found.items():
                    e = self._entries.get(name)
                    if name in skip or (e is not None and e.size == size and e.mtime >= mtime):
                        continue
                    self._set(name, size, mtime, mtime if e is None else max(e.stamp, mtime))
                for name in [n for n, e in self._entries.items() if n not in found and e.seen < began]:
                    if name not in self._writing:
                        self._drop(name)  # removed by another process
                victims = self._make_room(0)
            self._remove(victims)
            if start and (found or expired):
                log.info("%s: indexed %d chunk files (%d bytes) under %s, %d expired", self.name,
                         len(self._entries), self._used, self.root, len(expired))
