"""Redis faults seen through CacheEngine: a server unreachable from the start (refused, or a black hole that
never answers the handshake), restarted empty, hung (SIGSTOP), and stuttering (frozen by SIGSTOP 450 ms out of
every 600 ms). Every engine call returns within a bound derived from remote_timeout, never raises, never serves
wrong bytes, and the engine serves from Redis again once the server is back.

Bound per call: 2 x remote_timeout + SLACK_S. One call may pay two socket timeouts: a new connection's
handshake (redis-py's CLIENT SETINFO) and then the command; the back-off answers every later call at once.
tests/lmcache_core covers the tier alone under these faults; here the whole engine (lookup, retrieve, store,
flush) is timed.
"""

import random
import signal
import socket
import threading
import time

import pytest

from tests.redis_servers import LOOPBACK, free_port
from tests.reliability.common import CS, engine, kv_for, same_bytes, tokens

TIMEOUT_S = 0.3  # remote_timeout
SLACK_S = 0.5  # scheduling slack on a loaded 2-core machine
BOUND_S = 2 * TIMEOUT_S + SLACK_S
HANG_GUARD_S = 60  # a burst that has not returned by then is a hang
SEQS = 6


class Burst:
    """Engine calls (lookup, retrieve, store + flush) for `seconds` in a thread, each timed; retrieved
    bytes checked against what was stored."""

    def __init__(self, e, seqs, kvs):
        self.e, self.seqs, self.kvs = e, seqs, kvs
        self.latency: dict[str, float] = {"lookup": 0.0, "retrieve": 0.0, "store": 0.0, "flush": 0.0}
        self.served = self.asked = 0
        self.wrong: list[int] = []

    def _call(self, op, fn, *args):
        t0 = time.monotonic()
        out = fn(*args)
        self.latency[op] = max(self.latency[op], time.monotonic() - t0)
        return out

    def run(self, seconds: float, rng: random.Random) -> None:
        failures: list[BaseException] = []

        def body():
            try:
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    s = rng.randrange(len(self.seqs))
                    self._call("lookup", self.e.lookup, self.seqs[s])
                    n, out = self._call("retrieve", self.e.retrieve, self.seqs[s])
                    self.asked += len(self.seqs[s]) // CS
                    self.served += n // CS
                    if n and not same_bytes(out, self.kvs[s][:, :, :n]):
                        self.wrong.append(s)
                    if rng.random() < 0.3:
                        self._call("store", self.e.store, self.seqs[s], self.kvs[s])
                        self._call("flush", self.e.flush)
            except BaseException as exc:  # noqa: BLE001 - reaching the caller is the failure
                failures.append(exc)

        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join(HANG_GUARD_S)
        assert not t.is_alive(), f"an engine call hung for over {HANG_GUARD_S} s"
        assert not failures, f"an engine call raised: {failures[0]!r}"
        assert not self.wrong, f"sequences {self.wrong} were served with other bytes than stored"
        slow = {op: round(v, 3) for op, v in self.latency.items() if v > BOUND_S}
        assert not slow, f"calls slower than {BOUND_S} s (2 x remote_timeout {TIMEOUT_S} + {SLACK_S}): {slow}"


def _data(n=SEQS):
    return [tokens(3 * CS, seed=200 + s) for s in range(n)], [kv_for(3 * CS, seed=200 + s) for s in range(n)]


def _wait_served_from_redis(e, seqs, kvs, limit_s: float) -> float:
    """Seconds until every sequence is served whole (the engine's L2 holds one chunk: the rest is Redis)."""
    t0 = time.monotonic()
    while True:
        ok = True
        for s in range(len(seqs)):
            n, out = e.retrieve(seqs[s])
            assert n == 0 or same_bytes(out, kvs[s][:, :, :n])
            ok &= n == len(seqs[s])
        if ok:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < limit_s, f"not served from Redis {limit_s} s after it came back"
        for s in range(len(seqs)):  # a restarted server is empty: the engine writes again
            e.store(seqs[s], kvs[s])
        e.flush()
        time.sleep(0.1)


def _report(name, burst, extra=""):
    lat = ", ".join(f"{op} {v * 1000:.0f} ms" for op, v in burst.latency.items())
    print(f"\n[redis {name}] max latency: {lat} (bound {BOUND_S * 1000:.0f} ms); served {burst.served}/"
          f"{burst.asked} chunks{extra}")


def test_unreachable_from_start_refused_and_black_hole():
    seqs, kvs = _data()
    refused = engine(l2_chunks=1, remote_url=f"redis://{LOOPBACK}:{free_port()}", remote_timeout=TIMEOUT_S)
    # A listener with a full backlog that never accepts: the kernel drops further handshakes, so a connect
    # hangs until its timeout, as with a firewalled or powered-off host.
    hole = socket.socket()
    hole.bind((LOOPBACK, 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(hole.getsockname())
        fillers.append(c)
    black = engine(l2_chunks=1, remote_url=f"redis://{LOOPBACK}:{hole.getsockname()[1]}",
                   remote_timeout=TIMEOUT_S)
    try:
        for name, e in (("refused", refused), ("black hole", black)):
            burst = Burst(e, seqs, kvs)
            burst.run(2.0, random.Random(1))
            errors = dict(e.stats()["L4"]["errors"])
            _report(f"unreachable ({name})", burst, f"; L4 errors {errors}")
            assert burst.served <= burst.asked // 3 + 1, "only L2's single chunk can be served"
            probes = errors.get("connection", 0) + errors.get("timeout", 0)
            assert errors.get("backoff_skip", 0) > 10 and probes <= 4, errors
    finally:
        for e in (refused, black):
            e.close()
        for c in fillers:
            c.close()
        hole.close()


def test_restarted_empty_is_misses_then_refilled(redis_node):
    seqs, kvs = _data()
    e = engine(l2_chunks=1, remote_url=redis_node.url, remote_timeout=TIMEOUT_S)
    for s in range(SEQS):
        e.store(seqs[s], kvs[s])
    e.flush()
    assert _wait_served_from_redis(e, seqs, kvs, 1.0) < 1.0
    redis_node.kill()
    down = Burst(e, seqs, kvs)
    down.run(1.0, random.Random(2))
    redis_node.restart()  # no persistence: empty
    assert redis_node.client().dbsize() == 0
    back = Burst(e, seqs, kvs)
    back.run(1.0, random.Random(3))
    recovered = _wait_served_from_redis(e, seqs, kvs, 10.0)
    _report("down", down)
    _report("restarted empty", back, f"; serving every chunk from Redis again {recovered:.2f} s later")
    fresh = engine(l2_chunks=1, remote_url=redis_node.url, remote_timeout=TIMEOUT_S)  # another instance
    for s in range(SEQS):
        n, out = fresh.retrieve(seqs[s])
        assert n == len(seqs[s]) and same_bytes(out, kvs[s]), "the refilled server must hold exact chunks"
    e.close()
    fresh.close()


@pytest.mark.parametrize("mode", ["hung", "stutter"])  # stutter: frozen 450 ms of every 600 ms
def test_slow_server_bounded_latency(redis_node, mode):
    seqs, kvs = _data()
    e = engine(l2_chunks=1, remote_url=redis_node.url, remote_timeout=TIMEOUT_S)
    for s in range(SEQS):
        e.store(seqs[s], kvs[s])
    e.flush()
    stop = threading.Event()

    def stutter():  # frozen longer than remote_timeout, then running: some calls time out, some succeed
        while not stop.is_set():
            redis_node.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.45)
            redis_node.proc.send_signal(signal.SIGCONT)
            time.sleep(0.15)

    toggler = threading.Thread(target=stutter, daemon=True)
    if mode == "hung":
        redis_node.pause()
    else:
        toggler.start()
    burst = Burst(e, seqs, kvs)
    try:
        burst.run(2.5, random.Random(4))
    finally:
        stop.set()
        if toggler.is_alive():
            toggler.join()
        redis_node.resume()
    errors = dict(e.stats()["L4"]["errors"])
    recovered = _wait_served_from_redis(e, seqs, kvs, 10.0)
    _report(mode, burst, f"; L4 errors {errors}; every chunk from Redis again {recovered:.2f} s after SIGCONT")
    assert errors.get("timeout", 0) >= 1, "the fault never showed: the test did not test a slow server"
    if mode == "hung":
        assert burst.served <= burst.asked // 3 + 1, "a hung server serves nothing; L2 holds one chunk"
    e.close()
