"""DiskTier (L3) shared by threads of one process and by several processes on one directory: caps hold,
other processes' chunks are found, and no reader ever sees a torn or mixed file."""

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from tests.lmcache_core.disk_helpers import KiB, chunk_files, key, make_tier, value, wait_for, whole

__all__ = ["make_tier"]  # a fixture
REPO = Path(__file__).resolve().parents[2]


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
