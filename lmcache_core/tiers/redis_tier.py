"""L4: serialized chunks in Redis or Redis Cluster, shared by every engine instance that points at it.

Keys hold hex names only: the head `lmc:v1:{<key.name>}` and, for a chunk over `max_part_size`, parts
`lmc:v1:{<key.name>}:p<i>`. The hash tag puts a chunk's head and parts on one cluster slot (one node, one
MGET); different chunks spread over the shards. The head is the value itself or, for a split chunk, a
28-byte manifest (magic, parts, length, xxh3-64 of the value); a value of exactly 28 bytes is always split,
so a head's length says which it is and inline values are never copied. A put sends the parts, then the
head, in one pipeline on the slot's node (executed in order): a reader that finds a head finds its parts,
and parts that are missing, short or fail the checksum (expired first, deleted, rewritten meanwhile) are a
miss counted in errors["incomplete"].

Connections, routing, pipelines, back-off and faults are `tiers.redis_client` (the tier's `client`, which
`RedisLocks` shares): a fault is a miss or False, counted in `stats.errors[kind]`; `timeout` bounds each
socket operation.

usage(): Redis memory is bounded by the server's maxmemory and by `ttl`, not by us: capacity is 0 (unknown);
used_bytes and entries count what this process wrote (a chunk already present counts once) minus deleted.
"""

import struct
import threading
from collections.abc import Sequence

import redis
import xxhash

from ..keys import ChunkKey
from ..remote_url import RemoteURL
from .backoff import Backoff
from .base import Tier, TierUsage
from .redis_client import FAULTS, RedisClient, error_kind

PREFIX = "lmc:v1:"
MANIFEST = struct.Struct("<8sIQQ")  # magic, parts, total bytes, xxh3-64 of the value: 28 bytes
MANIFEST_MAGIC = b"LMCPARTS"
MAX_PARTS = 65536  # a forged manifest cannot make a reader ask for more


def head_name(key: ChunkKey) -> str:
    return f"{PREFIX}{{{key.name}}}"


def part_name(key: ChunkKey, i: int) -> str:
    return f"{PREFIX}{{{key.name}}}:p{i}"


class RedisTier(Tier[bytes]):
    def __init__(self, url: str | RemoteURL, *, ttl: float = 0.0, timeout: float = 2.0,
                 max_part_size: int = 16 * 2**20, batch_size: int = 32, name: str = "L4",
                 threads: int = 4, backoff: Backoff | None = None):
        super().__init__()
        for arg, value, low in (("ttl", ttl, 0), ("max_part_size", max_part_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"RedisTier {arg}: expected a number >= {low:g}, got {value!r}")
        self.name, self.ttl, self.max_part_size = name, ttl, int(max_part_size)
        self.client = RedisClient(url, timeout=timeout, batch_size=batch_size, threads=threads, backoff=backoff,
                                  name=name)
        self._stats_lock = threading.Lock()
        self._used = self._entries = 0

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "RedisTier":
        return cls(cfg.remote_url, ttl=cfg.remote_ttl, timeout=cfg.remote_timeout,
                   max_part_size=cfg.remote_max_part_size, batch_size=cfg.batch_size, **kwargs)

    @property
    def is_cluster(self) -> bool:
        return self.client.is_cluster

    def _run(self, items) -> list[list | None]:
        return self.client.run(items, self.stats.errors)

    # -- Tier API -----------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        replies = self._run([(head_name(k), [("EXISTS", head_name(k))]) for k in keys])
        return [r is not None and r[0] == 1 for r in replies]

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        heads = self._run([(head_name(k), [("GET", head_name(k))]) for k in keys])
        values: list[bytes | None] = [None] * len(keys)
        split: dict[int, tuple[int, int, int]] = {}  # index -> (parts, total, digest)
        for i, r in enumerate(heads):
            head = None if r is None else r[0]
            if head is not None and len(head) == MANIFEST.size:
                magic, n, total, digest = MANIFEST.unpack(head)
                if magic == MANIFEST_MAGIC and 0 < n <= min(total, MAX_PARTS):  # n bounds the MGET below
                    split[i] = (n, total, digest)
                else:
                    self.client.count(self.stats.errors, "incomplete")
            elif head is not None:
                values[i] = head
        order = list(split)
        parts = self._run([(head_name(keys[i]), [("MGET", *(part_name(keys[i], p) for p in range(split[i][0])))])
                          for i in order])
        for i, r in zip(order, parts):
            if r is None:  # the fault is counted already
                continue
            n, total, digest = split[i]
            value = b"".join(r[0]) if all(p is not None for p in r[0]) else b""
            if len(value) == total and xxhash.xxh3_64_intdigest(value) == digest:
                values[i] = value
            else:
                self.client.count(self.stats.errors, "incomplete")
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
        replies = self._run(batch)
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
        for k, r in zip(keys, self._run(probe)):
            if r is None or r[0] == 0:
                continue
            size, n = r[1], 0
            if size == MANIFEST.size and r[2].startswith(MANIFEST_MAGIC):
                _, n, size, _ = MANIFEST.unpack(r[2])
                n = min(n, MAX_PARTS)
            batch.append((head_name(k), [("DEL", head_name(k), *(part_name(k, p) for p in range(n)))]))
            freed.append(size)
        for size, r in zip(freed, self._run(batch)):
            if r is not None and r[0] > 0:
                with self._stats_lock:
                    self._used, self._entries = max(0, self._used - size), max(0, self._entries - 1)

    def usage(self) -> TierUsage:
        with self._stats_lock:
            return TierUsage(used_bytes=self._used, capacity_bytes=0, entries=self._entries)

    def clear(self) -> None:
        """Delete every `lmc:v1:*` key on every master (never FLUSHALL: the server may hold other data)."""
        if self._run([("clear", [("PING",)])])[0] is None:
            return
        for node in self.client.primaries():
            try:
                names = []
                for name in node.scan_iter(match=PREFIX + "*", count=1000):
                    names.append(name)
                    if len(names) == 1000:
                        self._unlink(node, names)
                self._unlink(node, names)
            except FAULTS as e:
                self.client.count(self.stats.errors, error_kind(e))
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
        self.client.close()
