"""The scheduler's view of the workers' caches: a request/reply channel over local (unix) sockets.

Under every deployment users run, vLLM's scheduler and its workers live in different processes (the OpenAI
server runs the worker in its own process even at TP=1; TP and PP add one process per rank). The memory
tiers belong to the workers, so the scheduler asks them: each worker rank serves its engine's answers on a
socket of its own (`LookupServer`, a thread in the worker process), and the scheduler sends every question
to all ranks at once and waits for all answers (`LookupClient`). A chunk counts as cached only when every
rank holds its slice.

Messages are zmq multipart frames: `[op, header (JSON), payload]`, payload = the chunk hashes the question is
about, 16 bytes each, back to back (the scheduler hashes prompts; a worker turns hashes into its own keys,
which carry its rank's KV spec). Replies are one JSON frame. Ops:
- `ask`:      {"seq", "owner": request id or null, "prefetch": bool} -> {"seq", "tiers": [tier of each chunk
              of the leading run], "claim": "hit" | "compute" | "busy" | null}. The single-flight claim (with
              an owner) is made by the lead rank only (TP rank 0 of the first stage), whose engine holds the
              locks; prefetch starts moving the run's L3/L4 chunks into memory where the load will run.
- `contains`: {"seq"} -> {"seq", "tiers": [tier or null per chunk]} (segment chunks, anywhere).
- `release`:  {"seq", "owner"} -> {"seq"}: the owner's claims on these chunks are given back.
- `reset`:    {"seq"} -> {"seq", "ok"}: the memory tiers (L1, L2) are emptied.
Sockets live in a directory only this user can enter, named by a hash of vLLM's engine id (shared by the
scheduler and its workers), the data-parallel rank and the worker's (pp, tp) rank.
"""

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import zmq

log = logging.getLogger(__name__)

HASH_BYTES = 16
_POLL_MS = 100  # how often the server thread checks whether it was asked to stop


def socket_path(engine_id: str, dp_rank: int, pp_rank: int, tp_rank: int) -> str:
    """Where worker (pp_rank, tp_rank) of the instance `engine_id` serves lookups."""
    base = os.path.join(tempfile.gettempdir(), f"lmcache-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    if os.stat(base).st_uid != os.getuid() or os.stat(base).st_mode & 0o077:
        raise PermissionError(f"{base}: the lookup sockets' directory must belong to this user with mode 0700")
    tag = hashlib.blake2b(engine_id.encode(), digest_size=8).hexdigest()
    return os.path.join(base, f"{tag}-dp{dp_rank}-pp{pp_rank}-tp{tp_rank}.sock")


def pack_hashes(hashes: Sequence[bytes]) -> bytes:
    return b"".join(hashes)


def unpack_hashes(blob: bytes) -> list[bytes]:
    if len(blob) % HASH_BYTES:
        raise ValueError(f"payload: expected a multiple of {HASH_BYTES} bytes of chunk hashes, got {len(blob)}")
    return [blob[i:i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES)]


class LookupServer:
    """Answers the scheduler's questions in the worker process: `handler(op, header, hashes) -> reply dict`
    runs on this server's thread (the engine is thread-safe)."""

    def __init__(self, path: str, handler: Callable[[str, dict, list[bytes]], dict]):
        self.path = path
        self._handler = handler
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"ipc://{path}")
        os.chmod(path, 0o600)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lmcache-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            ident, op, header, payload = self._sock.recv_multipart()
            head: dict = {}
            try:
                head = json.loads(header)
                reply = {"seq": head.get("seq"), **self._handler(op.decode(), head, unpack_hashes(payload))}
            except Exception as e:  # a bad question costs its answer (a miss), never the worker
                log.warning("lmcache: lookup %r failed: %r", op, e)
                reply = {"seq": head.get("seq") if isinstance(head, dict) else None, "error": repr(e)}
            self._sock.send_multipart([ident, json.dumps(reply).encode()])
        self._sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Question:
    """One question sent to every rank, and its answers as they arrive (None where a rank has not answered, or
    answered with an error)."""

    def __init__(self, seq: int, ranks: int):
        self.seq, self.asked_at = seq, time.monotonic()
        self.replies: list[dict | None] = [None] * ranks
        self.pending = set(range(ranks))

    @property
    def answered(self) -> bool:
        return not self.pending


class LookupClient:
    """The scheduler's end: one socket per worker rank, every question to all of them at once. A question
    can be waited for a short while and collected later (`send` / `wait`), so the scheduler never stalls for
    long on a worker that is busy; answers are routed to their question whenever they arrive."""

    def __init__(self, paths: Sequence[str], timeout_s: float):
        self.paths = list(paths)
        self.timeout_s = timeout_s
        self._ctx = zmq.Context.instance()
        self._socks = []
        for path in self.paths:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{path}")
            self._socks.append(sock)
        self._poller = zmq.Poller()
        for sock in self._socks:
            self._poller.register(sock, zmq.POLLIN)
        self._seq = 0
        self._open: dict[int, Question] = {}
        self._lock = threading.Lock()
        self._last_warning = 0.0

    def send(self, op: str, header: dict, hashes: Sequence[bytes] = (), *, expect_answer: bool = True) -> Question:
        """Send one question to every rank; its answers are collected by `wait` (or never: expect_answer False)."""
        with self._lock:
            self._seq += 1
            question = Question(self._seq, len(self._socks))
            frames = [op.encode(), json.dumps({**header, "seq": question.seq}).encode(), pack_hashes(hashes)]
            for sock in self._socks:
                sock.send_multipart(frames)
            if expect_answer:
                self._open[question.seq] = question
            return question

    def wait(self, question: Question, timeout_s: float) -> bool:
        """Receive answers for up to `timeout_s` (0: only what has arrived); True once every rank answered
        `question` (it is then forgotten)."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            while True:
                self._receive(0)
                if question.answered:
                    self._open.pop(question.seq, None)
                    return True
                left_ms = (deadline - time.monotonic()) * 1000
                if left_ms <= 0:
                    return False
                self._poller.poll(left_ms)

    def _receive(self, timeout_ms: float) -> None:
        for sock, _ in self._poller.poll(timeout_ms):
            rank = self._socks.index(sock)
            while True:
                try:
                    reply = json.loads(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                question = self._open.get(reply.get("seq"))
                if question is not None and rank in question.pending:  # else: a question nobody waits for
                    question.replies[rank] = None if "error" in reply else reply
                    question.pending.discard(rank)

    def forget(self, question: Question) -> None:
        with self._lock:
            self._open.pop(question.seq, None)

    def ask(self, op: str, header: dict, hashes: Sequence[bytes] = (), *, wait: bool = True) -> list[dict | None]:
        """Send one question to every rank; with `wait`, the answers in rank order (None: that rank did not
        answer within timeout_s, or answered with an error). Without `wait`, returns [] at once."""
        question = self.send(op, header, hashes, expect_answer=wait)
        if not wait:
            return []
        if not self.wait(question, self.timeout_s):
            self.forget(question)
            self.warn_silent(question)
        return question.replies

    def warn_silent(self, question: Question) -> None:
        if question.pending:
            self._warn(f"{len(question.pending)} of {len(self._socks)} workers did not answer within "
                       f"lookup_timeout={self.timeout_s}s (ranks {sorted(question.pending)}); the request computes")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:  # at most one line per 10 s while the workers stay silent
            self._last_warning = now
            log.warning("lmcache: %s", message)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks = []
