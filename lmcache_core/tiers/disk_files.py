"""L3's directory layout and the file operations on it: no index, no policy, no thread.

Layout under the cache directory (`local_cache_dir`), `name` being `ChunkKey.name`
(`<32 hex: spec fingerprint>-<32 hex: chunk hash>`):

    <root>/<xx>/<name>.lmc                        one chunk; xx = the chunk hash's first two hex digits
    <root>/<xx>/.<name>.lmc.<pid>.<random>.tmp    a write in flight, renamed over the chunk file once whole

So there are at most 256 fan-out directories, every chunk file matches `CHUNK_GLOB` (`*.lmc`) and nothing
else we write does. Chunk files may be deleted from outside at any moment: the tier answers a miss for them
and its index drops them (on the read that misses, and on the next rescan). `cleanup_command` gives a cron
line that deletes the chunks not written for a day and never touches a write in flight:

    find /path/to/local_cache_dir -name '*.lmc' -mmin +1440 -delete

Temp files do not match it; the tier removes a crashed writer's after `orphan_grace`. Every file is opened
relative to a directory fd with O_NOFOLLOW: no symlink is followed out of the root. Every method raises
OSError on a fault; the tier decides what a fault means.
"""

import contextlib
import errno
import os
import re
import shlex
import stat

SUFFIX = ".lmc"  # every chunk file's, and only theirs
CHUNK_GLOB = "*" + SUFFIX  # matches every chunk file's name (find -name, glob) and no temp file
TEMP_SUFFIX = ".tmp"
_CHUNK_RE = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{2})[0-9a-f]{30}\.lmc$")
_TMP_RE = re.compile(r"^\..+\.tmp$")
_SUBDIR_RE = re.compile(r"^[0-9a-f]{2}$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def subdir(name: str) -> str:
    """The fan-out directory of chunk `name`: its chunk hash's first two hex digits."""
    return name[33:35]


def relative_path(name: str) -> str:
    """Where chunk `name` lives, relative to the cache directory: `<xx>/<name>.lmc`."""
    return os.path.join(subdir(name), name + SUFFIX)


def chunk_name(file_name: str, sub: str | None = None) -> str | None:
    """The chunk name of a chunk file's name (None for any other file); with `sub`, only when the file sits
    in its own fan-out directory."""
    match = _CHUNK_RE.match(file_name)
    if match is None or (sub is not None and match.group(2) != sub):
        return None
    return file_name[: -len(SUFFIX)]


def is_temp(file_name: str) -> bool:
    return _TMP_RE.match(file_name) is not None


def cleanup_command(cache_dir: str, minutes: int = 1440) -> str:
    """A shell line (for cron) that deletes the chunk files under `cache_dir` not written for `minutes`."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 0:
        raise ValueError(f"cleanup_command minutes: expected an integer >= 0, got {minutes!r}")
    return f"find {shlex.quote(cache_dir)} -name {shlex.quote(CHUNK_GLOB)} -mmin +{minutes} -delete"


def write_all(fd: int, data) -> None:
    """Write every byte (os.write may write less than asked). Tests patch this to inject ENOSPC."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class ChunkFiles:
    """The chunk files under `root` (created if missing)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def read(self, name: str) -> tuple[bytes, float]:
        """The whole file in one read where the OS allows (never more than its size), and its mtime."""
        def op(dfd: int):
            fd = os.open(name + SUFFIX, _FILE_FLAGS, dir_fd=dfd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file", name + SUFFIX)
                parts, left = [], st.st_size
                while left > 0 and (part := os.read(fd, left)):
                    parts.append(part)
                    left -= len(part)
                return (parts[0] if len(parts) == 1 else b"".join(parts)), st.st_mtime
            finally:
                os.close(fd)

        return self._in_dir(subdir(name), op)

    def write(self, name: str, value, *, fsync_file: bool, fsync_dir: bool) -> None:
        """Write a temp file beside the chunk file, then rename it over: readers see the old file or the new
        one, whole. The temp file never outlives a failed write."""
        def op(dfd: int) -> None:
            tmp = f".{name}{SUFFIX}.{os.getpid()}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
            try:
                fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
                try:
                    write_all(fd, value)
                    if fsync_file:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name + SUFFIX, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            if fsync_dir:
                os.fsync(dfd)

        self._in_dir(subdir(name), op, create=True)

    def stat(self, name: str) -> os.stat_result:
        return self._in_dir(subdir(name), lambda dfd: os.stat(name + SUFFIX, dir_fd=dfd, follow_symlinks=False))

    def gone(self, name: str) -> bool:
        """Whether chunk `name`'s file is certainly absent (False when a fault leaves it unknown)."""
        try:
            self.stat(name)
        except FileNotFoundError:
            return True
        except OSError:
            pass
        return False

    def unlink(self, sub: str, file_name: str) -> None:
        """Remove `<sub>/<file_name>` (a chunk file or a temp file)."""
        self._in_dir(sub, lambda dfd: os.unlink(file_name, dir_fd=dfd))

    def walk(self) -> list[tuple[str, os.DirEntry]]:
        """(subdir, DirEntry) of every regular file in the fan-out directories; symlinks are skipped."""
        with os.scandir(self.root) as top:
            subs = [d.name for d in top if _SUBDIR_RE.match(d.name) and d.is_dir(follow_symlinks=False)]
        files = []
        for sub in subs:
            with contextlib.suppress(FileNotFoundError), os.scandir(os.path.join(self.root, sub)) as it:
                files += [(sub, e) for e in it if e.is_file(follow_symlinks=False)]
        return files

    def _in_dir(self, sub: str, op, *, create: bool = False):
        """op(dir_fd) in fan-out directory `sub`, opened without following a symlink."""
        path = os.path.join(self.root, sub)
        try:
            dfd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
            os.makedirs(path, mode=0o700, exist_ok=True)  # also the root, if a clean-up removed it
            dfd = os.open(path, _DIR_FLAGS)
        try:
            return op(dfd)
        finally:
            os.close(dfd)
