"""L4: serialized chunks in Redis or Redis Cluster, shared by every engine instance that points at it.

Keys hold hex names only: the head `lmc:v1:{<key.name>}` and, for a chunk over `max_part_size`, parts
`lmc:v1:{<key.name>}:p<i>`. The hash tag puts a chunk's head and parts on one cluster slot (one node, one
MGET); different chunks spread over the shards. The head is the value itself or, for a split chunk, a
28-byte manifest (magic, parts, length, xxh3-64 of the value); a value of exactly 28 bytes is always split,
so a head's length says which it is and inline values are never copied. A put sends the parts, then the
head, in one pipeline on the slot's node (executed in order): a reader that finds a head finds its parts,
and parts that are missing, short or fail the checksum (expired first, deleted, rewritten meanwhile) are a
miss counted in errors["incomplete"].

Pipelines are sent on redis-py's connections and their replies read by `tiers.resp`, which moves a value
from the socket straight into its own buffer (redis-py's reader: quadratic in a value's size; values come
back as `bytearray`). Cluster (`redis-cluster://`, or a `redis://` server saying `cluster_enabled:1`): each
batch is split by the node serving each slot and the per-node pipelines run on a small thread pool, so the
shards answer in parallel (bench.tiers, 3 local masters, 2 cores: 1.44-1.75x one plain connection's GET
throughput; with redis-py's own reader 0.93-1.10x). redis-py's ClusterPipeline is not used: it reads nodes
one after another and, on a timeout, re-sends each failed command alone, which would multiply the latency
bound. Node faults refresh redis-py's slot map in the background (at most every REFRESH_S); a MOVED reply
patches the slot's owner at once (redis-py's `move_slot`) and the item is retried once there; ASK (a slot
being migrated) is a miss.

Faults (connection, timeout, auth; per-item "response" errors are counted only) are a miss or False,
counted in `stats.errors[kind]`, and start a back-off (`tiers.backoff`) for that server (cluster: that
node), 0.5 s doubling to 30 s, during which calls answer at once without touching the network
(errors["backoff_skip"]); then one call probes, and a success resets it. `timeout` bounds each socket
operation, so a call returns within about `timeout` even from a hung server.

usage(): Redis memory is bounded by the server's maxmemory and by `ttl`, not by us: capacity is 0 (unknown);
used_bytes and entries count what this process wrote (a chunk already present counts once) minus deleted.
"""

import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import redis
import redis.cluster
import redis.exceptions as rex
import redis.utils
import xxhash
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..keys import ChunkKey
from ..remote_url import RemoteURL, parse_remote_url
from . import resp
from .backoff import Backoff
from .base import Tier, TierUsage

log = logging.getLogger(__name__)

PREFIX = "lmc:v1:"
MANIFEST = struct.Struct("<8sIQQ")  # magic, parts, total bytes, xxh3-64 of the value: 28 bytes
MANIFEST_MAGIC = b"LMCPARTS"
MAX_PARTS = 65536  # a forged manifest cannot make a reader ask for more
REFRESH_S = 0.5  # slot-map re-reads while a cluster node is failing: a failover is seen within this
CONNECT, SERVER = "connect", "server"  # back-off targets: making the client; a single server (cluster: node names)
_CHANGING = (rex.ClusterDownError, rex.TryAgainError, rex.MasterDownError)
_FAULTS = (rex.RedisError, rex.RedisClusterException, OSError)

Item = tuple[str, list[tuple]]  # (a key whose slot routes the item, commands run in order in one pipeline)


def head_name(key: ChunkKey) -> str:
    return f"{PREFIX}{{{key.name}}}"


def part_name(key: ChunkKey, i: int) -> str:
    return f"{PREFIX}{{{key.name}}}:p{i}"


def error_kind(e: BaseException) -> str:
    """The stats.errors bucket of a Redis fault."""
    if isinstance(e, rex.RedisClusterException) and isinstance(e.__cause__, _FAULTS):
        return error_kind(e.__cause__)  # "cannot be connected", with the node's own error as the cause
    if isinstance(e, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError, rex.NoPermissionError)):
        return "auth"
    if isinstance(e, rex.TimeoutError):
        return "timeout"
    if isinstance(e, (rex.ConnectionError, rex.RedisClusterException, OSError)):
        return "connection"
    return "response"


class RedisTier(Tier[bytes]):
    def __init__(self, url: str | RemoteURL, *, ttl: float = 0.0, timeout: float = 2.0,
                 max_part_size: int = 16 * 2**20, batch_size: int = 32, name: str = "L4",
                 threads: int = 4, backoff: Backoff | None = None):
        super().__init__()
        if isinstance(url, str):
            url = parse_remote_url(url)
        if not isinstance(url, RemoteURL):
            raise TypeError(f"RedisTier url: expected a str or RemoteURL, got {type(url).__name__}")
        for arg, value, low in (("ttl", ttl, 0), ("timeout", timeout, 1e-9), ("max_part_size", max_part_size, 1),
                                ("batch_size", batch_size, 1), ("threads", threads, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"RedisTier {arg}: expected a number >= {low:g}, got {value!r}")
        self.name, self.url, self.ttl, self.timeout = name, url, ttl, timeout
        self.max_part_size, self.batch_size, self.threads = int(max_part_size), batch_size, threads
        self.backoff = backoff or Backoff()
        self._client: redis.Redis | redis.cluster.RedisCluster | None = None
        self._connect_lock, self._stats_lock = threading.Lock(), threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"lmc-{name}")  # threads start on first use
        self._refreshing, self._refreshed_at = None, 0.0  # background slot-map refresh (cluster)
        self._used = self._entries = 0
        self._closed = False

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "RedisTier":
        return cls(cfg.remote_url, ttl=cfg.remote_ttl, timeout=cfg.remote_timeout,
                   max_part_size=cfg.remote_max_part_size, batch_size=cfg.batch_size, **kwargs)

    # -- connection -------------------------------------------------------------------------------------

    @property
    def is_cluster(self) -> bool:
        return isinstance(self._client, redis.cluster.RedisCluster)

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
                log.info("RedisTier %s: connected to %s (%s, %s parser)", self.name, self.url,
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

    def _count(self, errors: Counter, kind: str, n: int = 1) -> None:
        with self._stats_lock:
            errors[kind] += n

    def _fault(self, e: BaseException, target: str, token: int, errors: Counter) -> None:
        kind = error_kind(e)
        self._count(errors, kind)
        if self.backoff.delay(target) == 0:
            log.warning("RedisTier %s: %s (%s: %s); backing off", self.name, target, kind, e)
        self.backoff.failed(target, token)
        self._refresh_soon(target)

    def _refresh(self, failed: str | None = None) -> None:
        try:
            self._client.nodes_manager.initialize(last_failed_node_name=failed)
        except _FAULTS as e:
            log.debug("RedisTier %s: slot map refresh failed: %s", self.name, e)
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

    def run(self, items: Sequence[Item], errors: Counter | None = None) -> list[list | None]:
        """Each item's commands, in order, in one pipeline on the node that serves the item's slot; per item
        its replies, or None when it could not run (fault, back-off; counted in `errors`)."""
        errors = self.stats.errors if errors is None else errors
        out: list[list | None] = [None] * len(items)
        token = 0 if self._client is not None else self.backoff.admit(CONNECT)
        if self._closed or token is None or not items:
            if items and not self._closed:
                self._count(errors, "backoff_skip")
            return out
        try:
            client = self._connect()
        except _FAULTS as e:
            self._fault(e, CONNECT, token, errors)
            return out
        self.backoff.ok(CONNECT)
        todo = list(range(len(items)))
        for attempt in range(2):
            redirected: list[int] = []
            tasks = [(target, node, idx[i:i + self.batch_size])
                     for target, (node, idx) in self._route(client, items, todo, errors).items()
                     for i in range(0, len(idx), self.batch_size)]
            if len(tasks) == 1:
                self._run_batch(*tasks[0], items, out, redirected, errors)
            elif tasks:  # shards answer in parallel (socket reads release the GIL)
                list(self._pool.map(lambda t: self._run_batch(*t, items, out, redirected, errors), tasks))
            if redirected and attempt == 0:  # retry once on the new owners; re-read the whole map soon
                self._refresh_soon(None)
                todo = redirected
            else:
                if redirected:  # still moving after one refresh
                    self._count(errors, "response", len(redirected))
                break
        return out

    def _route(self, client, items, todo, errors) -> dict[str, tuple[redis.Redis, list[int]]]:
        if not isinstance(client, redis.cluster.RedisCluster):
            return {SERVER: (client, todo)}
        groups: dict[str, tuple[redis.Redis, list[int]]] = {}
        for i in todo:
            try:
                node = client.nodes_manager.get_node_from_slot(redis.cluster.key_slot(items[i][0].encode()))
                groups.setdefault(node.name, (client.get_redis_connection(node), []))[1].append(i)
            except _FAULTS as e:  # slot not covered (a master died and nobody took over yet)
                self._count(errors, error_kind(e))
                self._refresh_soon(None)
        return groups

    def _run_batch(self, target, node, idx, items, out, redirected, errors) -> None:
        token = self.backoff.admit(target)
        if token is None:
            self._count(errors, "backoff_skip")
            self._refresh_soon(target)
            return
        try:
            replies = resp.execute(node, [cmd for i in idx for cmd in items[i][1]])
        except _FAULTS as e:
            self._fault(e, target, token, errors)
            return
        self.backoff.ok(target)
        pos = 0
        for i in idx:
            mine, pos = replies[pos:pos + len(items[i][1])], pos + len(items[i][1])
            bad = next((r for r in mine if isinstance(r, Exception)), None)
            if bad is None:
                out[i] = mine
            elif isinstance(bad, rex.MovedError):  # the slot has a new owner: patch the map from the reply
                self._moved(bad)
                redirected.append(i)
            else:
                self._count(errors, error_kind(bad))
                if isinstance(bad, _CHANGING):  # a failover in progress: re-read the map soon, no retry now
                    self._refresh_soon(target)

    # -- Tier API -----------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        replies = self.run([(head_name(k), [("EXISTS", head_name(k))]) for k in keys])
        return [r is not None and r[0] == 1 for r in replies]

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        heads = self.run([(head_name(k), [("GET", head_name(k))]) for k in keys])
        values: list[bytes | None] = [None] * len(keys)
        split: dict[int, tuple[int, int, int]] = {}  # index -> (parts, total, digest)
        for i, r in enumerate(heads):
            head = None if r is None else r[0]
            if head is not None and len(head) == MANIFEST.size:
                magic, n, total, digest = MANIFEST.unpack(head)
                if magic == MANIFEST_MAGIC and 0 < n <= min(total, MAX_PARTS):  # n bounds the MGET below
                    split[i] = (n, total, digest)
                else:
                    self._count(self.stats.errors, "incomplete")
            elif head is not None:
                values[i] = head
        order = list(split)
        parts = self.run([(head_name(keys[i]), [("MGET", *(part_name(keys[i], p) for p in range(split[i][0])))])
                          for i in order])
        for i, r in zip(order, parts):
            if r is None:  # the fault is counted already
                continue
            n, total, digest = split[i]
            value = b"".join(r[0]) if all(p is not None for p in r[0]) else b""
            if len(value) == total and xxhash.xxh3_64_intdigest(value) == digest:
                values[i] = value
            else:
                self._count(self.stats.errors, "incomplete")
        with self._stats_lock:
            hit = [v for v in values if v is not None]
            self.stats.hits += len(hit)
            self.stats.misses += len(values) - len(hit)
            self.stats.bytes_read += sum(len(v) for v in hit)
        return values

    def _set(self, name: str, value) -> tuple:
        return ("SET", name, value, "PX", max(1, round(self.ttl * 1000))) if self.ttl > 0 else ("SET", name, value)

    def put(self, items: Sequence[tuple[ChunkKey, bytes]]) -> list[bool]:
        batch = []
        for key, value in items:
            head, cmds = head_name(key), [("EXISTS", head_name(key))]
            if len(value) <= self.max_part_size and len(value) != MANIFEST.size:
                cmds.append(self._set(head, value))
            else:
                view, size = memoryview(value), self.max_part_size
                n = max(1, -(-len(value) // size))
                cmds += [self._set(part_name(key, p), view[p * size:(p + 1) * size]) for p in range(n)]
                manifest = MANIFEST.pack(MANIFEST_MAGIC, n, len(value), xxhash.xxh3_64_intdigest(value))
                cmds.append(self._set(head, manifest))  # last: readers see the chunk only once it is whole
            batch.append((head, cmds))
        replies = self.run(batch)
        with self._stats_lock:
            for (_, value), r in zip(items, replies):
                if r is not None:
                    self.stats.bytes_written += len(value)
                    if r[0] == 0:
                        self._used, self._entries = self._used + len(value), self._entries + 1
        return [r is not None for r in replies]

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        probe = [(head_name(k), [("EXISTS", h), ("STRLEN", h), ("GETRANGE", h, 0, MANIFEST.size - 1)])
                 for k, h in ((k, head_name(k)) for k in keys)]
        batch, freed = [], []
        for k, r in zip(keys, self.run(probe)):
            if r is None or r[0] == 0:
                continue
            size, n = r[1], 0
            if size == MANIFEST.size and r[2].startswith(MANIFEST_MAGIC):
                _, n, size, _ = MANIFEST.unpack(r[2])
                n = min(n, MAX_PARTS)
            batch.append((head_name(k), [("DEL", head_name(k), *(part_name(k, p) for p in range(n)))]))
            freed.append(size)
        for size, r in zip(freed, self.run(batch)):
            if r is not None and r[0] > 0:
                with self._stats_lock:
                    self._used, self._entries = max(0, self._used - size), max(0, self._entries - 1)

    def usage(self) -> TierUsage:
        with self._stats_lock:
            return TierUsage(used_bytes=self._used, capacity_bytes=0, entries=self._entries)

    def clear(self) -> None:
        """Delete every `lmc:v1:*` key on every master (never FLUSHALL: the server may hold other data)."""
        if self.run([("clear", [("PING",)])])[0] is None:
            return
        client = self._client
        nodes = ([client.get_redis_connection(n) for n in client.get_primaries()] if self.is_cluster else [client])
        for node in nodes:
            try:
                names = []
                for name in node.scan_iter(match=PREFIX + "*", count=1000):
                    names.append(name)
                    if len(names) == 1000:
                        self._unlink(node, names)
                self._unlink(node, names)
            except _FAULTS as e:
                self._count(self.stats.errors, error_kind(e))
        with self._stats_lock:
            self._used = self._entries = 0

    @staticmethod
    def _unlink(node: redis.Redis, names: list) -> None:
        pipe = node.pipeline(transaction=False)
        for name in names:
            pipe.unlink(name)  # one key per command: one node holds keys of many slots
        pipe.execute()
        names.clear()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
            self._client = None
