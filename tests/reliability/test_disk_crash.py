"""L3 crash safety and disk-full, through CacheEngine.

kill -9: a child process (disk_writer_child.py) stores 512 KiB sequences in a loop and prints each one once
`flush` returned; it is killed with SIGKILL at a random moment, several times on one directory. After each
kill (every other one aimed at a moment the child holds a temp file open; disk_fsync file and never) a new
engine starts on the directory: orphan temp files are gone (DiskTier orphan_grace 0.05 s), the
index matches the files, every acknowledged sequence comes back byte-exact, the one in flight is exact or a
miss, and no file fails verification (writes are temp file + rename, so a killed writer never leaves a torn
chunk file).

Disk full: a real 2 MiB tmpfs (we mount it; an injected ENOSPC only where mount is refused, in a test named
so). Stores keep returning, the L3 tier stops writing (disk_full counted, no temp file left), every chunk
written before keeps being served, and writes resume once space is freed and the back-off has passed.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmcache_core.tiers import disk_files
from lmcache_core.tiers.disk import DiskTier
from tests.reliability.common import REPO, chunk_files, engine, same_bytes, temp_files
from tests.reliability.disk_writer_child import BIG, BIG_CHUNK_BYTES, SEQ_TOKENS, big_kv, big_tokens

MIN_ROUNDS, MAX_ROUNDS = 4, 12  # kill rounds; more until one kill has left an orphan temp file
CHUNKS_PER_SEQ = SEQ_TOKENS // BIG.chunk_size


def _reader(path: Path, **tier_kw):
    tier = DiskTier(str(path), 10**9, **tier_kw)
    return engine(spec=BIG, l2_chunks=1, chunk_bytes=BIG_CHUNK_BYTES, byte_tiers=[tier], codec="none"), tier


def _writing_temp_file(pid: int) -> bool:
    """Whether process `pid` holds a chunk temp file open (a write under way: it is renamed after close)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".tmp"):
                return True
        except OSError:
            continue
    return False


def _run_and_kill(path: Path, start: int, rng: random.Random, *, aimed: bool, fsync: str) -> list[int]:
    """Start the writer at sequence `start` and SIGKILL it: at a random moment, or (aimed) while it holds a
    chunk temp file open (a write under way). Returns the acknowledged sequence ids."""
    with open(path.parent / "writer.log", "a+") as log:  # not a pipe: a full pipe would stall the writer
        proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.disk_writer_child", str(path),
                                 str(start), fsync], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        acked: list[int] = []
        reader = threading.Thread(target=lambda: acked.extend(int(line) for line in proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while len(acked) < 2:  # running and writing (imports take a few seconds)
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the writer exited ({proc.returncode}): {log.read()[-2000:]}")
            assert time.monotonic() < deadline, "the writer did not start writing within 60 s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if aimed:
            deadline = time.monotonic() + 2.0
            while not _writing_temp_file(proc.pid) and time.monotonic() < deadline:
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(5)
    return list(acked)


def test_kill9_mid_write_then_restart(tmp_path):
    path = tmp_path / "l3"
    rng = random.Random(7)
    acked_all: list[int] = []
    inflight: list[int] = []
    orphans_seen = torn_seen = 0
    rounds = 0
    start = 0
    while rounds < MIN_ROUNDS or (orphans_seen == 0 and rounds < MAX_ROUNDS):
        aimed, fsync = rounds % 2 == 1, ("file", "never")[rounds % 4 // 2]
        acked = _run_and_kill(path, start, rng, aimed=aimed, fsync=fsync)
        rounds += 1
        acked_all += acked
        inflight.append(acked[-1] + 1)
        start = acked[-1] + 2
        orphans = temp_files(path)
        orphans_seen += len(orphans)
        print(f"round {rounds} ({'aimed' if aimed else 'random'}, fsync {fsync}): {len(acked)} acknowledged, "
              f"{len(orphans)} orphan temp files")
        time.sleep(0.1)  # older than orphan_grace

        e, tier = _reader(path, orphan_grace=0.05)
        try:
            assert temp_files(path) == [], "the restarted tier must remove a killed writer's temp files"
            files = chunk_files(path)
            usage = tier.usage()
            assert usage.entries == len(files) and usage.used_bytes == sum(f.stat().st_size for f in files), (
                f"index rebuilt from the directory: {usage} vs {len(files)} files")
            assert len(files) in range(CHUNKS_PER_SEQ * len(acked_all),
                                       CHUNKS_PER_SEQ * (len(acked_all) + len(inflight)) + 1)
            for i in acked_all:  # promised: flush had returned before the kill
                n, out = e.retrieve(big_tokens(i))
                assert n == SEQ_TOKENS and same_bytes(out, big_kv(i)), f"acknowledged sequence {i} lost or wrong"
            for i in inflight:  # whatever was written whole, in order, or a miss
                n, out = e.retrieve(big_tokens(i))
                assert n == 0 or same_bytes(out, big_kv(i)[:, :, :n]), f"sequence {i} in flight served wrong"
            torn_seen += tier.stats.corrupt
            assert tier.stats.corrupt == 0, "a chunk file failed verification: a torn write became visible"
        finally:
            e.close()
    print(f"\n[disk kill -9] {rounds} kills, {len(acked_all)} acknowledged sequences "
          f"({len(acked_all) * CHUNKS_PER_SEQ} chunk files) all exact after restart; {orphans_seen} orphan temp "
          f"files left by kills, all removed at restart; {torn_seen} torn files")
    assert orphans_seen >= 1, f"no kill in {rounds} landed inside a write: the orphan clean-up was not exercised"


# -- disk full -----------------------------------------------------------------------------------------


def _mount_tmpfs(mnt: Path) -> str | None:
    """Mount a 2 MiB tmpfs on `mnt`; None on success, else why not."""
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run mount: {e}"
    return None if proc.returncode == 0 else f"mount refused: {proc.stderr.strip() or proc.returncode}"


@pytest.fixture(params=["real-tmpfs-2MiB", "injected-ENOSPC-only-where-mount-is-refused"])
def small_disk(request, tmp_path, monkeypatch):
    mnt = tmp_path / "mnt"
    refused = _mount_tmpfs(mnt)
    if request.param.startswith("real"):
        if refused:
            pytest.skip(f"{refused}; the injected-ENOSPC variant runs instead")
        yield mnt
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)
        return
    if not refused:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)
        pytest.skip("a real 2 MiB tmpfs could be mounted: the real-tmpfs variant covers disk full")
    written = [0]
    real_write_all = disk_files.write_all

    def write_all(fd, data):  # a 2 MiB file system: ENOSPC once that much has been written
        if written[0] + len(data) > 2 << 20:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        written[0] += len(data)
        real_write_all(fd, data)

    monkeypatch.setattr(disk_files, "write_all", write_all)
    yield mnt


def test_disk_full_through_the_engine(small_disk):
    path = small_disk / "l3"
    e, tier = _reader(path, full_backoff=1.5)  # capacity 1 GB: the file system runs out first
    stored = []
    for i in range(12):  # 512 KiB sequences into 2 MiB
        e.store(big_tokens(i), big_kv(i))
        e.flush()
        if all(tier.contains(e.keys(big_tokens(i)))):
            stored.append(i)
        if tier.stats.errors["disk_full"]:
            break
    assert tier.stats.errors["disk_full"] == 1, f"the disk never filled: {dict(tier.stats.errors)}"
    assert 1 <= len(stored) < 4, f"2 MiB holds 3 sequences of 512 KiB at most, {len(stored)} were written"
    assert temp_files(path) == [], "a failed write must remove its temp file"
    assert not tier.writable

    full_at = last = i
    for i in range(full_at + 1, full_at + 5):  # inside the back-off: refused without touching the disk
        (_, took) = timed_store(e, i)
        assert took < 1.0 and not tier.writable
        last = i
    assert tier.stats.errors["disk_full"] == 1, "writes during the back-off must not reach the disk"

    other, _ = _reader(path)  # reads continue, in this engine and in another one
    for reader in (e, other):
        for i in range(last + 1):
            n, out = reader.retrieve(big_tokens(i))
            if i in stored:
                assert n == SEQ_TOKENS and same_bytes(out, big_kv(i)), f"sequence {i}, written before ENOSPC"
            else:
                assert n == 0 or same_bytes(out, big_kv(i)[:, :, :n])
    assert tier.stats.corrupt == 0
    other.close()

    e.clear()  # space freed
    deadline = time.monotonic() + 5
    while not tier.writable:
        assert time.monotonic() < deadline, "the disk-full back-off never ended"
        time.sleep(0.05)
    timed_store(e, 100)
    assert all(tier.contains(e.keys(big_tokens(100)))), "writes resume once space is free"
    e.tiers.memory[0].clear()
    n, out = e.retrieve(big_tokens(100))
    assert n == SEQ_TOKENS and same_bytes(out, big_kv(100))
    print(f"\n[disk full] {len(stored)} sequences written before ENOSPC, L3 errors {dict(tier.stats.errors)}; "
          f"reads served exact, writes resumed after the back-off")
    e.close()


def timed_store(e, i: int):
    t0 = time.monotonic()
    e.store(big_tokens(i), big_kv(i))
    e.flush()
    return None, time.monotonic() - t0
