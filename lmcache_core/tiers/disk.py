"""L3: one file per chunk under a local directory, shared by every worker process on the node.

The files and their layout are `tiers.disk_files` (`<root>/<xx>/<name>.lmc`, written as a temp file renamed
over the chunk file, so readers see the old file or the new one, whole; a reader holding an open file keeps
reading it after another process unlinks or replaces it). This process's index of them (sizes, LRU order,
the cap) is `tiers.disk_index`. This module ties the two together and runs the maintenance thread.

Each process keeps its own index and evicts LRU by its own access order; files it never touched rank by
mtime. A background thread re-scans the directory every `rescan_interval` seconds (and once at start;
`rescan()` runs one now): it counts other processes' files, drops files removed behind its back (another
process, an outside clean-up), sweeps files older than `ttl`, removes temp files older than `orphan_grace`
(a crashed writer's) and evicts down to the cap. The cap is therefore approximate across processes: another
process's writes count from the next rescan, and processes evicting at once may remove more than the
overage. Within one process it is exact.

Outside clean-up (`find DIR -name '*.lmc' -delete`, at any moment) costs misses only: a read of a deleted
file is a miss and drops it from the index at once; a file deleted unread leaves the index at the next
rescan, so `usage()` agrees with the directory again from then on.

fsync policies (config `disk_fsync`): "never" (rename only), "file" (fsync the file before the rename),
"always" (also fsync the directory after it). ENOSPC/EDQUOT on a write stop puts for
`full_backoff` seconds (`writable` is False, `stats.errors["disk_full"]`); other faults count as
`stats.errors["io"]`. No method raises on an I/O fault: it answers a miss or False.
"""

import errno
import logging
import stat
import threading
import time
from collections.abc import Sequence

from ..errors import TierUnavailableError
from ..keys import ChunkKey
from .base import Tier, TierUsage
from .disk_files import SUFFIX, ChunkFiles, chunk_name, is_temp, subdir
from .disk_index import DiskIndex

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("never", "file", "always")  # the names of config.disk_fsync


class DiskTier(Tier[bytes]):
    """Chunk files under `path`, at most `capacity` bytes. `ttl` (0 = off) is swept every `sweep_interval`
    seconds; other processes' writes are counted every `rescan_interval` seconds; a full disk stops
    writes for `full_backoff` seconds; temp files older than `orphan_grace` seconds are removed.
    `index` (a `DiskIndex`) is this process's view; `index.sizes()` shows its bookkeeping."""

    def __init__(self, path: str, capacity: int, *, fsync: str = "never", ttl: float = 0.0,
                 sweep_interval: float = 60.0, rescan_interval: float = 10.0, full_backoff: float = 30.0,
                 orphan_grace: float = 60.0, name: str = "L3"):
        super().__init__()
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"DiskTier fsync: expected one of {FSYNC_POLICIES}, got {fsync!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"DiskTier capacity: expected a positive number of bytes, got {capacity!r}")
        for arg, v, low in (("ttl", ttl, 0), ("full_backoff", full_backoff, 0), ("orphan_grace", orphan_grace, 0),
                            ("sweep_interval", sweep_interval, 1e-3), ("rescan_interval", rescan_interval, 1e-3)):
            if not v >= low:
                raise ValueError(f"DiskTier {arg}: expected seconds >= {low}, got {v!r}")
        self.name, self.capacity, self.ttl = name, capacity, ttl
        self.full_backoff, self.orphan_grace = full_backoff, orphan_grace
        self._fsync_file, self._fsync_dir = fsync != "never", fsync == "always"
        try:
            self.files = ChunkFiles(path)
        except OSError as e:
            raise TierUnavailableError(f"DiskTier: cannot create local_cache_dir {path!r}: {e}") from e
        self.root = self.files.root
        self.index = DiskIndex(capacity)
        self._full_until = 0.0
        self._stats_lock, self._scan_lock, self._stop = threading.Lock(), threading.Lock(), threading.Event()
        self.rescan()
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
        """Indexed files are taken as present (no I/O); others are looked for on disk (another process may
        have written them since the last rescan)."""
        out = []
        for name in (k.name for k in keys):
            seen = self.index.look(name)
            if seen.entry is not None or seen.removing:
                out.append(seen.entry is not None and not self._expired(seen.entry.mtime))
                continue
            try:
                st = self.files.stat(name)
            except OSError as err:
                self._fault(err)
                out.append(False)
                continue
            out.append(stat.S_ISREG(st.st_mode) and not self._expired(st.st_mtime))
            if out[-1]:
                self._unlink(self.index.adopt(name, st.st_size, st.st_mtime, seen.ticket, touch=False), evicted=True)
        return out

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Each chunk's whole file, unverified (the engine verifies), or None."""
        out = []
        for name in (k.name for k in keys):
            seen = self.index.look(name)
            data = None
            if not seen.removing:  # also when not indexed: another process may have written it
                try:
                    data, mtime = self.files.read(name)
                except OSError as err:
                    self._fault(err)
                    self.index.forget(name, seen.entry)  # gone (or unreadable) unless put again since
                if data is not None and self._expired(mtime):
                    data = None
                    self._remove([name], expired=True)
            with self._stats_lock:
                self.stats.misses += data is None
                self.stats.hits += data is not None
                self.stats.bytes_read += len(data or b"")
            if data is not None:
                self._unlink(self.index.adopt(name, len(data), mtime, seen.ticket, touch=True), evicted=True)
            out.append(data)
        return out

    def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> list[bool]:
        """Write each value whole (temp file, rename); False when refused (too big, disk full) or failed."""
        return [self._put_one(key.name, value) for key, value in items]

    def _put_one(self, name: str, value: bytes) -> bool:
        n = len(value)
        if not self.writable:
            return False
        fits, victims = self.index.reserve(name, n)
        self._unlink(victims, evicted=True)
        if not fits:
            return False
        try:
            self.files.write(name, value, fsync_file=self._fsync_file, fsync_dir=self._fsync_dir)
            ok = True
        except OSError as err:
            self._fault(err)
            ok = False
        if ok:
            with self._stats_lock:
                self.stats.bytes_written += n
        if self.index.wrote(name, n, ok, time.time()):  # delete() was called while this write was in flight
            self._remove([name])
        return ok

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Unlink each key's file, also one this process never indexed (another process wrote it)."""
        self._remove([k.name for k in keys])

    def usage(self) -> TierUsage:
        used, entries = self.index.usage()
        return TierUsage(used, self.capacity, entries)

    def clear(self) -> None:
        """Remove every chunk file and temp file under the root (other files are left alone)."""
        before = self.index.clear_begin()
        try:
            listing = self.files.walk()
        except OSError as err:
            self._fault(err)
            return
        for sub, entry in listing:
            name = chunk_name(entry.name)
            if name is None:
                if is_temp(entry.name):
                    self._unlink_file(sub, entry.name)
                continue
            take = self.index.clear_take(name, before)
            if take.ok:
                self._unlink_file(sub, entry.name)
                self.index.removed([name])
                self.index.forget(name, take.entry)
        self.index.clear_end(before)

    def close(self) -> None:
        """Stop the maintenance thread (idempotent). The tier stays usable, without rescans or sweeps."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    # -- rescan, TTL sweep, orphan removal ----------------------------------------------------------------

    def rescan(self) -> None:
        """Bring the index in line with the directory now (what the maintenance thread does every interval):
        count files other processes wrote, drop files removed behind this process's back, sweep TTL-expired
        files and old temp files, and evict down to the cap."""
        with self._scan_lock:
            scan, now = self.index.scan_begin(), time.time()
            try:
                listing = self.files.walk()
            except OSError as err:  # keep the index as it is; the next pass retries
                self._fault(err)
                return
            found, expired = {}, []
            for sub, entry in listing:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                name = chunk_name(entry.name, sub)
                if name is not None:
                    if self._expired(st.st_mtime):
                        expired.append(name)
                    else:
                        found[name] = (st.st_size, st.st_mtime)
                elif is_temp(entry.name) and now - st.st_mtime > self.orphan_grace:
                    self._unlink_file(sub, entry.name)  # left by a crashed writer
            self._remove(expired, expired=True)
            for name, e in self.index.scan_found(scan, found):
                if self.files.gone(name):
                    self.index.forget(name, e)  # removed by another process or an outside clean-up
            self._unlink(self.index.evict(), evicted=True)

    def _maintain(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.rescan()
            except Exception:  # the thread must outlive any surprise; the next pass retries
                log.exception("%s: directory scan failed", self.name)

    # -- removal and faults -----------------------------------------------------------------------------

    def _expired(self, mtime: float) -> bool:
        return self.ttl > 0 and time.time() - mtime > self.ttl

    def _remove(self, names: list[str], expired: bool = False) -> None:
        """Remove files; one this process is writing now goes when that write ends (unless TTL-expired)."""
        self._unlink(self.index.doom(names, expired=expired), evicted=expired)

    def _unlink(self, names: list[str], *, evicted: bool = False) -> None:
        """Unlink chunk files the index has doomed, and tell it."""
        if not names:
            return
        if evicted:
            with self._stats_lock:
                self.stats.evictions += len(names)
        for name in names:
            self._unlink_file(subdir(name), name + SUFFIX)
        self.index.removed(names)

    def _unlink_file(self, sub: str, file_name: str) -> None:
        try:
            self.files.unlink(sub, file_name)
        except OSError as err:
            self._fault(err)

    def _fault(self, err: OSError) -> None:
        if isinstance(err, FileNotFoundError):
            return  # removed by another process, a sweep or an outside clean-up: a plain miss
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        with self._stats_lock:
            self.stats.errors["disk_full" if full else "io"] += 1
            self._full_until = time.monotonic() + self.full_backoff if full else self._full_until
        log.warning("%s: %s under %s: %s%s", self.name, "disk full" if full else "I/O error", self.root, err,
                    f"; no writes for {self.full_backoff:.0f} s" if full else "")
