"""Per-target exponential back-off for a tier whose servers can fail: while a target is backing off, calls
answer at once without touching the network; then one caller probes, and a success resets it."""

import threading
import time

BACKOFF_INITIAL_S, BACKOFF_MAX_S = 0.5, 30.0


class Backoff:
    """Per-target exponential back-off. `admit` returns a token (None: skip the network); the first
    `failed` per token doubles the delay, so calls that were in flight together count as one failure."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, maximum: float = BACKOFF_MAX_S, clock=time.monotonic):
        self.initial, self.maximum, self.clock = initial, maximum, clock
        self._state: dict[str, list] = {}  # target -> [until, delay, generation]
        self._lock = threading.Lock()

    def admit(self, target: str) -> int | None:
        with self._lock:
            st = self._state.get(target)
            if st is None:
                return 0
            now = self.clock()
            if now < st[0]:
                return None
            st[0] = now + st[1]  # this caller probes; the others keep skipping until it answers
            return st[2]

    def failed(self, target: str, token: int) -> None:
        with self._lock:
            st = self._state.setdefault(target, [0.0, 0.0, 0])
            if st[2] == token:
                st[1] = self.initial if st[1] == 0 else min(self.maximum, st[1] * 2)
                st[0], st[2] = self.clock() + st[1], st[2] + 1

    def ok(self, target: str) -> None:
        with self._lock:
            self._state.pop(target, None)

    def delay(self, target: str) -> float:
        with self._lock:
            return self._state.get(target, (0.0, 0.0))[1]
