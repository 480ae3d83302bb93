"""What every benchmark shares: timing with warm-up, percentiles, and a JSON record of the machine.

Conventions (Liger-Kernel / gpt-fast): warm-up runs are reported apart, the device is synchronized before
the clock stops, and each figure is the median with p20/p80 over repeats.
"""

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    warmup_s: float
    repeats: int

    def rate(self, amount: float) -> float:
        """`amount` per second at the median (e.g. bytes -> bytes/s)."""
        return amount / self.median_s if self.median_s > 0 else float("inf")


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3,
            device: torch.device | str | None = None) -> Timing:
    """Run `fn` `warmup` times (timed together, reported apart), then `repeats` times one by one."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    samples = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t)
    samples.sort()
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return Timing(statistics.median(samples), q[0], q[3], warmup_s, repeats)


def _measure_cuda(fn: Callable[[], Any], repeats: int) -> Timing:
    """Device time of one call on CUDA: triton's `do_bench` (CUDA events around each call, L2 flushed before
    each, so the host's launch work overlaps the flush), after a first call timed on the host as warm-up."""
    from triton.testing import do_bench

    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    got = sorted(ms / 1e3 for ms in do_bench(fn, warmup=25, rep=100, return_mode="all"))
    q = statistics.quantiles(got, n=5, method="inclusive") if len(got) > 1 else got * 4
    return Timing(statistics.median(got), q[0], q[3], warmup_s, max(repeats, len(got)))


def measure_together(fns: dict[str, Callable[[], Any]], *, repeats: int = 20, warmup: int = 3,
                     device: torch.device | str | None = None) -> dict[str, Timing]:
    """`measure` for several functions whose ratios matter, interleaved: each repeat runs every function
    once, so load from other processes on a shared machine slows all of them alike. On CUDA each is timed
    by `_measure_cuda` instead: a GPU is not shared, and host-side timing of a ~20 µs kernel measures the
    launch, not the copy."""
    if device is not None and torch.device(device).type == "cuda":
        return {name: _measure_cuda(fn, repeats) for name, fn in fns.items()}
    warmup_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        _sync(device)
        warmup_s[name] = time.perf_counter() - t0
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t)
    out = {}
    for name, got in samples.items():
        got.sort()
        q = statistics.quantiles(got, n=5, method="inclusive") if len(got) > 1 else got * 4
        out[name] = Timing(statistics.median(got), q[0], q[3], warmup_s[name], repeats)
    return out


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import triton

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_sha": _git_sha(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass
class Report:
    """A benchmark's results: rows of measured figures plus the machine they were measured on."""

    name: str
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)
    notes: list[str] = field(default_factory=list)

    def write(self, path: str | None) -> None:
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2, default=str)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned text table of `columns` from `rows` (floats to 3 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def emit(report: Report, columns: list[str], output: str | None) -> Report:
    """Print the machine, the table and the notes; write the JSON report to `output` when given."""
    print(json.dumps(report.machine))
    print_table(report.rows, columns)
    for note in report.notes:
        print(note)
    report.write(output)
    return report
