"""The progress line of `bench.ttft` on stderr."""

import sys
import time


class Progress:
    """One stderr line per scenario phase, redrawn in place: `[  12s] ours-L3  measure [####....] 3/8`."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.t0, self.open = stream, time.perf_counter(), False

    def update(self, scenario: str, phase: str, i: int, n: int) -> None:
        self.open = True
        bar = "#" * (20 * i // max(n, 1))
        self.stream.write(f"\r[{time.perf_counter() - self.t0:5.0f}s] {scenario:<24} {phase:<8} [{bar:<20}] {i}/{n} ")
        self.stream.flush()

    def done(self, scenario: str) -> None:
        if not self.open:
            return
        self.open = False
        self.stream.write(f"\r[{time.perf_counter() - self.t0:5.0f}s] {scenario:<24} done{' ' * 40}\n")
        self.stream.flush()
