"""A client for one Redis server or a Redis Cluster, shared by the L4 tier (`redis_tier`) and the
single-flight locks (`redis_locks`): batched pipelines, cluster routing, slot-map refresh, back-off and Lua
scripts. It knows nothing of chunks or locks.

`run(items)` takes items of (a key whose slot routes it, commands run in order in one pipeline) and answers
per item its replies, or None when it could not run. Pipelines are sent on redis-py's connections and their
replies read by `tiers.resp`. Cluster (`redis-cluster://`, or a `redis://` server saying `cluster_enabled:1`):
each batch is split by the node serving each slot and the per-node pipelines run on a small thread pool, so
the shards answer in parallel (bench.tiers, 3 local masters, 2 cores: 1.44-1.75x one plain connection's GET
throughput; with redis-py's own reader 0.93-1.10x). redis-py's ClusterPipeline is not used: it reads nodes
one after another and, on a timeout, re-sends each failed command alone, which would multiply the latency
bound. Node faults refresh redis-py's slot map in the background (at most every REFRESH_S); a MOVED reply
patches the slot's owner at once (redis-py's `move_slot`) and the item is retried once there; ASK (a slot
being migrated) is a miss.

Scripts: `script(source)` registers a Lua script and returns its SHA1, for commands
("EVALSHA", sha, numkeys, ...). The first pipeline to each node carries SCRIPT LOAD of the scripts its items
use, ahead of them (no extra round trip); a NOSCRIPT reply (the server restarted empty, failed over, or ran
SCRIPT FLUSH) forgets what that node had loaded and the item is retried once with the load ahead of it.

Faults (connection, timeout, auth; per-item "response" errors are counted only) are a None, counted in
`errors[kind]`, and start a back-off (`tiers.backoff`) for that server (cluster: that node), 0.5 s doubling
to 30 s, during which calls answer at once without touching the network (errors["backoff_skip"]); then one
call probes, and a success resets it. `timeout` bounds each socket operation, so a call returns within about
`timeout` even from a hung server.
"""

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import redis
import redis.cluster
import redis.exceptions as rex
import redis.utils
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..remote_url import RemoteURL, parse_remote_url
from . import resp
from .backoff import Backoff

log = logging.getLogger(__name__)

REFRESH_S = 0.5  # slot-map re-reads while a cluster node is failing: a failover is seen within this
CONNECT, SERVER = "connect", "server"  # back-off targets: making the client; a single server (cluster: node names)
_CHANGING = (rex.ClusterDownError, rex.TryAgainError, rex.MasterDownError)
FAULTS = (rex.RedisError, rex.RedisClusterException, OSError)  # what a Redis fault raises

Item = tuple[str, list[tuple]]  # (a key whose slot routes the item, commands run in order in one pipeline)


class _Batch(NamedTuple):
    """One pipeline to send: the items `idx` on `node`, behind `loads` SCRIPT LOADs."""

    target: str  # back-off target: SERVER, or the node's name
    node: redis.Redis
    idx: list[int]
    commands: list[tuple]
    loads: int
    token: int  # from backoff.admit


def error_kind(e: BaseException) -> str:
    """The errors bucket of a Redis fault."""
    if isinstance(e, rex.RedisClusterException) and isinstance(e.__cause__, FAULTS):
        return error_kind(e.__cause__)  # "cannot be connected", with the node's own error as the cause
    if isinstance(e, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError, rex.NoPermissionError)):
        return "auth"
    if isinstance(e, rex.TimeoutError):
        return "timeout"
    if isinstance(e, (rex.ConnectionError, rex.RedisClusterException, OSError)):
        return "connection"
    return "response"


class RedisClient:
    def __init__(self, url: str | RemoteURL, *, timeout: float = 2.0, batch_size: int = 32, threads: int = 4,
                 backoff: Backoff | None = None, name: str = "L4"):
        if isinstance(url, str):
            url = parse_remote_url(url)
        if not isinstance(url, RemoteURL):
            raise TypeError(f"RedisClient url: expected a str or RemoteURL, got {type(url).__name__}")
        for arg, value, low in (("timeout", timeout, 1e-9), ("batch_size", batch_size, 1), ("threads", threads, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"RedisClient {arg}: expected a number >= {low:g}, got {value!r}")
        self.url, self.timeout, self.batch_size, self.threads, self.name = url, timeout, batch_size, threads, name
        self.backoff = backoff or Backoff()
        self._client: redis.Redis | redis.cluster.RedisCluster | None = None
        self._connect_lock = threading.Lock()  # making the client (network I/O), the refresh state
        self._lock = threading.Lock()  # counters, scripts: never held across I/O
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"lmc-{name}")  # threads start on first use
        self._refreshing, self._refreshed_at = None, 0.0  # background slot-map refresh (cluster)
        self._scripts: dict[str, str] = {}  # sha -> source
        self._loaded: dict[str, set[str]] = {}  # back-off target (server or node) -> shas it has
        self._closed = False

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._client, redis.cluster.RedisCluster)

    def script(self, source: str) -> str:
        """Register a Lua script; its SHA1, for ("EVALSHA", sha, numkeys, *keys, *args) commands in `run`."""
        sha = hashlib.sha1(source.encode()).hexdigest()
        with self._lock:
            self._scripts[sha] = source
        return sha

    def count(self, errors: Counter, kind: str, n: int = 1) -> None:
        """errors[kind] += n, safely beside the pipelines counting theirs."""
        with self._lock:
            errors[kind] += n

    # -- connection -------------------------------------------------------------------------------------

    def _kwargs(self) -> dict:
        kw = self.url.redis_kwargs()
        kw.update(socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
        return kw

    def _make_cluster(self, nodes) -> redis.cluster.RedisCluster:
        kw = {k: v for k, v in self._kwargs().items() if k not in ("host", "port", "db")}
        return redis.cluster.RedisCluster(startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in nodes],
                                          require_full_coverage=False, retry=Retry(NoBackoff(), 0), **kw)

    def _connect(self):
        """The client, created on first use (the server may be down at start); detects a cluster."""
        if self._client is not None:
            return self._client
        with self._connect_lock:
            if self._client is None:
                if self.url.is_cluster:
                    client = self._make_cluster(self.url.nodes)
                else:
                    client = redis.Redis(retry=Retry(NoBackoff(), 0), **self._kwargs())
                    if self.url.scheme != "unix" and self._cluster_enabled(client):
                        client.close()
                        client = self._make_cluster(self.url.nodes)
                log.info("Redis %s: connected to %s (%s, %s parser)", self.name, self.url,
                         "cluster" if isinstance(client, redis.cluster.RedisCluster) else "single server",
                         "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python (pip install hiredis)")
                self._client = client
        return self._client

    @staticmethod
    def _cluster_enabled(client: redis.Redis) -> bool:
        try:
            return client.info("cluster").get("cluster_enabled") == 1
        except rex.ResponseError:  # INFO not allowed for this ACL user (auth errors are not ResponseErrors)
            client.ping()
            return False

    def primaries(self) -> list[redis.Redis]:
        """A redis-py client per master (the one server when not a cluster); call after a `run` succeeded."""
        client = self._connect()
        if not self.is_cluster:
            return [client]
        return [client.get_redis_connection(n) for n in client.get_primaries()]

    def node_for(self, key: str) -> str | None:
        """'host:port' of the node the slot map routes `key` to now (None when not a cluster)."""
        if not self.is_cluster:
            return None
        return self._client.nodes_manager.get_node_from_slot(redis.cluster.key_slot(key.encode())).name

    def _fault(self, e: BaseException, target: str, token: int, errors: Counter) -> None:
        kind = error_kind(e)
        self.count(errors, kind)
        if self.backoff.delay(target) == 0:
            log.warning("Redis %s: %s (%s: %s); backing off", self.name, target, kind, e)
        self.backoff.failed(target, token)
        self._refresh_soon(target)

    def _refresh(self, failed: str | None = None) -> None:
        try:
            self._client.nodes_manager.initialize(last_failed_node_name=failed)
        except FAULTS as e:
            log.debug("Redis %s: slot map refresh failed: %s", self.name, e)
        finally:
            self._refreshed_at = time.monotonic()

    def _moved(self, e: rex.MovedError) -> None:
        try:
            self._client.nodes_manager.move_slot(e)
        except KeyError:  # a slot the map does not cover: the next refresh fills it
            pass

    def _refresh_soon(self, failed: str | None) -> None:
        """Cluster: re-read the slot map in the background (at most every REFRESH_S), so a failover is seen
        while the dead node's back-off keeps calls instant."""
        if failed in (CONNECT, SERVER) or not self.is_cluster or self._closed:
            return
        with self._connect_lock:
            if self._refreshing is not None and not self._refreshing.done():
                return
            if time.monotonic() - self._refreshed_at < REFRESH_S:
                return
            self._refreshed_at = time.monotonic()
            try:
                self._refreshing = self._pool.submit(self._refresh, failed)
            except RuntimeError:  # close() raced us: the pool is shut down
                pass

    # -- batched execution ------------------------------------------------------------------------------

    def run(self, items: Sequence[Item], errors: Counter, *, threads: bool = True) -> list[list | None]:
        """Each item's commands, in order, in one pipeline on the node that serves the item's slot; per item
        its replies, or None when it could not run (fault, back-off; counted in `errors`). Several nodes'
        pipelines run on the thread pool, in batches of `batch_size` items; threads=False (small replies,
        such as locks') sends one pipeline per node from this thread, all before reading any: no hand-offs."""
        out: list[list | None] = [None] * len(items)
        token = 0 if self._client is not None else self.backoff.admit(CONNECT)
        if self._closed or token is None or not items:
            if items and not self._closed:
                self.count(errors, "backoff_skip")
            return out
        try:
            client = self._connect()
        except FAULTS as e:
            self._fault(e, CONNECT, token, errors)
            return out
        self.backoff.ok(CONNECT)
        todo = list(range(len(items)))
        for attempt in range(2):
            moved: list[int] = []
            reload: list[int] = []
            size = self.batch_size if threads else len(todo)  # threads=False: one pipeline per node
            tasks = [(target, node, idx[i:i + size])
                     for target, (node, idx) in self._route(client, items, todo, errors).items()
                     for i in range(0, len(idx), size)]
            batches = [b for b in (self._batch(items, *t, errors) for t in tasks) if b is not None]
            if len(batches) > 1 and threads:  # shards answer in parallel (socket reads release the GIL)
                done = self._pool.map(lambda b: (b, self._execute(b.node, b.commands)), batches)
            elif len(batches) > 1:
                done = zip(batches, resp.execute_each([(b.node, b.commands) for b in batches], self.timeout))
            else:
                done = ((b, self._execute(b.node, b.commands)) for b in batches)
            for batch, replies in done:
                self._finish(items, batch, replies, out, moved, reload, errors)
            if moved and attempt == 0:  # retry once on the new owners; re-read the whole map soon
                self._refresh_soon(None)
            todo = moved + reload
            if not todo:
                break
            if attempt == 1:  # still moving after one refresh, or NOSCRIPT right after SCRIPT LOAD
                self.count(errors, "response", len(todo))
        return out

    def _route(self, client, items, todo, errors) -> dict[str, tuple[redis.Redis, list[int]]]:
        if not isinstance(client, redis.cluster.RedisCluster):
            return {SERVER: (client, todo)}
        groups: dict[str, tuple[redis.Redis, list[int]]] = {}
        for i in todo:
            try:
                node = client.nodes_manager.get_node_from_slot(redis.cluster.key_slot(items[i][0].encode()))
                groups.setdefault(node.name, (client.get_redis_connection(node), []))[1].append(i)
            except FAULTS as e:  # slot not covered (a master died and nobody took over yet)
                self.count(errors, error_kind(e))
                self._refresh_soon(None)
        return groups

    def _loads(self, target: str, commands) -> list[tuple]:
        """SCRIPT LOAD of each registered script `commands` call that `target` has not loaded yet."""
        with self._lock:
            have = self._loaded.get(target, set())
            shas = dict.fromkeys(c[1] for c in commands if c[0] == "EVALSHA" and c[1] not in have)
            return [("SCRIPT", "LOAD", self._scripts[sha]) for sha in shas if sha in self._scripts]

    def _batch(self, items, target, node, idx, errors) -> _Batch | None:
        """The pipeline to send to `node`; None while `target` backs off."""
        token = self.backoff.admit(target)
        if token is None:
            self.count(errors, "backoff_skip")
            self._refresh_soon(target)
            return None
        commands = [cmd for i in idx for cmd in items[i][1]]
        loads = self._loads(target, commands)
        return _Batch(target, node, idx, loads + commands, len(loads), token)

    @staticmethod
    def _execute(node, commands) -> list | BaseException:
        try:
            return resp.execute(node, commands)
        except FAULTS as e:
            return e

    def _finish(self, items, batch: _Batch, replies, out, moved, reload, errors) -> None:
        """Hand a pipeline's replies to its items (or count its fault)."""
        target = batch.target
        if isinstance(replies, BaseException):
            if not isinstance(replies, FAULTS):
                raise replies
            self._fault(replies, target, batch.token, errors)
            return
        self.backoff.ok(target)
        with self._lock:
            self._loaded.setdefault(target, set()).update(
                r.decode() if isinstance(r, (bytes, bytearray)) else r
                for r in replies[:batch.loads] if not isinstance(r, Exception))
        pos = batch.loads
        for i in batch.idx:
            mine, pos = replies[pos:pos + len(items[i][1])], pos + len(items[i][1])
            bad = next((r for r in mine if isinstance(r, Exception)), None)
            if bad is None:
                out[i] = mine
            elif isinstance(bad, rex.MovedError):  # the slot has a new owner: patch the map from the reply
                self._moved(bad)
                moved.append(i)
            elif isinstance(bad, rex.NoScriptError):  # the node lost its scripts: load them again
                with self._lock:
                    self._loaded.pop(target, None)
                reload.append(i)
            else:
                self.count(errors, error_kind(bad))
                if isinstance(bad, _CHANGING):  # a failover in progress: re-read the map soon, no retry now
                    self._refresh_soon(target)

    def close(self) -> None:
        """Idempotent; later calls answer None at once."""
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
            self._client = None
