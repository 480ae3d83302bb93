"""Our log lines in vLLM's log: the loggers of `connectors`, `lmcache_core` and `kernels` write through vLLM's
own handlers (its format, its level, its stream), once the connector is created in a process.

A failing tier (Redis down, a full disk) would otherwise repeat the same warning for every chunk of every
request: warnings are rate-limited per message, one line per WINDOW_S, and the next line that gets through
says how many were held back.
"""

import logging
import threading
import time

PACKAGES = ("connectors", "lmcache_core", "kernels")
WINDOW_S = 10.0


class _ToVllm(logging.Handler):
    """Hands records to vLLM's handlers; warnings and worse at most once per message and window."""

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target = target
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, template) -> (last shown, held)
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            key, now = (record.name, str(record.msg)), time.monotonic()
            with self._lock_:
                last, held = self._seen.get(key, (-WINDOW_S, 0))
                if now - last < WINDOW_S:
                    self._seen[key] = (last, held + 1)
                    return
                self._seen[key] = (now, 0)
            if held:
                record.msg = f"{record.msg} ({held} similar message(s) held back in the last {WINDOW_S:.0f}s)"
        for handler in self.target.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def attach_to_vllm_logging() -> None:
    """Route our packages' records to vLLM's logger configuration (idempotent; nothing when vLLM's logging
    is not configured, e.g. VLLM_CONFIGURE_LOGGING=0: then the application's own configuration applies)."""
    vllm = logging.getLogger("vllm")
    if not vllm.handlers:
        return
    for name in PACKAGES:
        ours = logging.getLogger(name)
        if any(isinstance(h, _ToVllm) for h in ours.handlers):
            continue
        ours.addHandler(_ToVllm(vllm))
        ours.setLevel(vllm.level or logging.INFO)
        ours.propagate = False
