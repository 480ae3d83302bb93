"""kill -9 of a Redis Cluster master (3 masters + 3 replicas) under sustained store/retrieve load from
several threads and engine instances, through CacheEngine with a one-chunk L2 so reads go to Redis.

Checked: no call raises, no retrieved chunk differs from what was stored, the hit rate comes back after the
replica takes over (timed and printed), and the tier's back-off keeps the engines off the dead node: after
the kill a listener takes the dead master's port and counts every connection the engines open to it.
tests/lmcache_core covers the tier alone under the same fault and an engine-level run without these
measurements; this test adds the hit-rate timeline and the connection count.
"""

import random
import socket
import threading
import time

from tests.redis_servers import LOOPBACK
from tests.reliability.common import CS, cluster_seeds, engine, kv_for, same_bytes, tokens

ENGINES, THREADS_PER_ENGINE = 3, 2
SEQS, SEQ_CHUNKS = 30, 2
WINDOW_S = 0.25  # hit-rate buckets
BASELINE_S = 1.5  # load before the kill
AFTER_FAILOVER_S = 4.0  # load on the new topology
# Back-off 0.5 s doubling to 30 s per engine: over the ~7 s a dead node is watched, one engine probes it at
# most ~5 times, plus in-flight calls that fail together (measured: 3 per engine, 7 in all). Without the
# back-off every call routed to it would connect: thousands (the count of such calls is printed).
MAX_CONNECTS_PER_ENGINE = 8


class PortWatch:
    """Listens on a dead node's port and counts the connections clients open to it (each is closed at
    once, so to the client it is a failed connection, as a refused one is). Connections are sorted by the
    first command: redis-py opens with CLIENT SETINFO/HELLO, a replica of the dead master with PING/REPLCONF."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, port))
        self.sock.listen(128)
        self.counts = {"client": 0, "replication": 0, "unknown": 0}
        self.times: list[float] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(0.2)
                try:
                    first = conn.recv(512).upper()
                except OSError:
                    first = b""
            kind = ("client" if b"SETINFO" in first or b"HELLO" in first or b"CLUSTER" in first
                    else "replication" if b"PING" in first or b"REPLCONF" in first or b"PSYNC" in first
                    else "unknown")
            self.counts[kind] += 1
            self.times.append(time.monotonic())

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone may not)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(2)


def _hit_rate(events, t0: float, t1: float) -> float | None:
    asked = sum(a for t, a, _ in events if t0 <= t < t1)
    return None if asked == 0 else sum(g for t, _, g in events if t0 <= t < t1) / asked


def test_master_kill9_under_engine_load(redis_cluster_replicas):
    cluster = redis_cluster_replicas
    url = f"redis-cluster://{cluster_seeds(cluster)}"
    engines = [engine(l2_chunks=1, remote_url=url, remote_timeout=0.5) for _ in range(ENGINES)]
    seqs = [tokens(SEQ_CHUNKS * CS, seed=s) for s in range(SEQS)]
    kvs = [kv_for(SEQ_CHUNKS * CS, seed=s) for s in range(SEQS)]
    for s in range(SEQS):
        engines[0].store(seqs[s], kvs[s])
    engines[0].flush()

    stop = threading.Event()
    failures: list[BaseException] = []
    wrong: list[str] = []
    events: list[tuple[float, int, int]] = []  # (time, chunks asked, chunks served) per retrieve
    calls = [0]
    lock = threading.Lock()

    def worker(e, seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            s = rng.randrange(SEQS)
            try:
                if rng.random() < 0.25:
                    e.store(seqs[s], kvs[s])
                    got = None
                else:
                    n, out = e.retrieve(seqs[s])
                    got = n // CS
                    if n and not same_bytes(out, kvs[s][:, :, :n]):
                        wrong.append(f"sequence {s}: {n} tokens differ from what was stored")
            except BaseException as exc:  # noqa: BLE001 - anything reaching the caller fails the test
                failures.append(exc)
                return
            with lock:
                calls[0] += 1
                if got is not None:
                    events.append((time.monotonic(), SEQ_CHUNKS, got))

    threads = [threading.Thread(target=worker, args=(e, 100 * i + j), daemon=True)
               for i, e in enumerate(engines) for j in range(THREADS_PER_ENGINE)]
    started = time.monotonic()
    for t in threads:
        t.start()
    watch = None
    failover_s: list[float] = []
    try:
        time.sleep(BASELINE_S)
        victim = cluster.masters()[0]
        replicas = cluster.replicas_of(victim)
        killed = time.monotonic()
        cluster.kill(victim)
        watch = PortWatch(victim.port)
        calls_at_kill = calls[0]
        cluster.wait_for_failover(victim, replicas, timeout=30)
        failover_s.append(time.monotonic() - killed)
        time.sleep(AFTER_FAILOVER_S)
    finally:
        stop.set()
        ended = time.monotonic()
        for t in threads:
            t.join(15)
        if watch is not None:
            watch.close()
    calls_after_kill = calls[0] - calls_at_kill

    baseline = _hit_rate(events, started + 0.3, killed)
    windows = []
    t = killed
    while t < ended - WINDOW_S:
        windows.append((t - killed, _hit_rate(events, t, t + WINDOW_S)))
        t += WINDOW_S
    # recovered: the first window from which every later window is back at the baseline
    recovered_s = None
    for i, (offset, _) in enumerate(windows):
        if all(rate is not None and rate >= 0.99 * baseline for _, rate in windows[i:]):
            recovered_s = offset
            break
    worst = min(rate for _, rate in windows if rate is not None)
    errors = [dict(e.stats()["L4"]["errors"]) for e in engines]
    print(f"\n[failover] kill -9 of master :{victim.port}; replica promoted and cluster ok after "
          f"{failover_s[0]:.2f} s; hit rate {baseline:.3f} before, worst {WINDOW_S}s window {worst:.3f}, back to "
          f"baseline {recovered_s if recovered_s is None else round(recovered_s, 2)} s after the kill; "
          f"{calls_after_kill} engine calls after the kill, connections to the dead port {watch.counts}; "
          f"tier errors per engine {errors}")
    for e in engines:
        e.close()

    assert not failures, f"{len(failures)} calls raised, first: {failures[0]!r}"
    assert not wrong, wrong[:5]
    assert baseline > 0.99, f"before the kill every chunk should come from Redis; hit rate {baseline:.3f}"
    assert worst < 0.9 * baseline, "the kill never showed in the hit rate: the test did not test a fault"
    assert recovered_s is not None, f"the hit rate never came back: {windows}"
    assert recovered_s < failover_s[0] + 3.0, (
        f"hit rate back {recovered_s:.2f} s after the kill, the replica took over at {failover_s[0]:.2f} s: "
        f"the engines should follow within the slot-map refresh (0.5 s) and one back-off probe")
    clients = watch.counts["client"] + watch.counts["unknown"]
    assert clients <= ENGINES * MAX_CONNECTS_PER_ENGINE, (
        f"{clients} connections to the dead node over {ended - killed:.1f} s and {calls_after_kill} calls: "
        f"the back-off should keep each engine to a few probes")
    for err in errors:
        assert err.get("backoff_skip", 0) > 0, f"no call was answered from the back-off: {err}"
        assert err.get("connection", 0) + err.get("timeout", 0) <= MAX_CONNECTS_PER_ENGINE, err
