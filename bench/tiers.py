"""`python -m bench.tiers`: put/get GB/s of each tier beside its raw baseline, measured in the same run.

Per tier, the same chunk bytes through the tier and through the plain way of moving them:
- L1 / L2 (memory tiers): `MemoryTier.put` / `read_into` vs a `torch` `copy_` into preallocated buffers (on
  a CPU, L1 is an arena like L2, as in the engine);
- L3 (disk): `DiskTier.put` / `get` vs plain `open().write()` + rename / `open().read()` of the same bytes;
- L4 (Redis, with `--remote-url`): `RedisTier.put` / `get` vs redis-py `SET` / `GET` of the same bytes in one
  pipeline on one connection (`--baseline-url`, default the first node of the URL). A cluster spreads chunks
  over its shards; the plain single connection is the baseline that must lose.
And the engine's lookup of 512 chunks held in memory (with and without hashing the tokens).
With `--remote-url`, also the single-flight step of one request missing `--chunks` chunks, alone, on the
locks the engine builds (local, then Redis): the old sequence (`held_by_other` of the first chunk, then
`acquire`: two round trips) as the baseline of `Locks.claim` (one), on fresh chunk keys every call.
"""

import argparse
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import redis
import torch

from bench.common import Report, emit, measure, measure_together
from lmcache_core import CacheConfig, CacheEngine, KVSpec
from lmcache_core.keys import ChunkKey
from lmcache_core.tiers.disk import DiskTier
from lmcache_core.tiers.memory import ArenaAllocator, MemoryTier, device_allocator

# name -> (layers, kv heads, head dim): real models' per-token KV geometry (bf16).
SHAPES = {"smollm2-135m": (30, 3, 64), "llama3-8b": (32, 8, 128)}


@dataclass(frozen=True)
class Config:
    shape: str = "smollm2-135m"
    chunk_size: int = 256
    chunks: int = 16
    repeats: int = 5
    disk_dir: str | None = None
    remote_url: str | None = None
    baseline_url: str | None = None
    output: str | None = None


def _chunks(cfg: Config) -> tuple[list[ChunkKey], list[torch.Tensor]]:
    layers, heads, dim = SHAPES[cfg.shape]
    keys = [ChunkKey(bytes(16), i.to_bytes(16, "little")) for i in range(cfg.chunks)]
    kvs = [torch.randn(layers, 2, cfg.chunk_size, heads, dim).to(torch.bfloat16) for _ in range(cfg.chunks)]
    return keys, kvs


def _together(cfg, ours, baseline):
    """Timings of ours and its baseline, interleaved (a shared machine's load hits both alike)."""
    t = measure_together({"ours": ours, "baseline": baseline}, repeats=cfg.repeats)
    return t["ours"], t["baseline"]


def _row(tier, op, nbytes, ours, base):
    return {"tier": tier, "op": op, "MB": nbytes / 1e6, "ours_GBps": ours.rate(nbytes) / 1e9,
            "baseline_GBps": base.rate(nbytes) / 1e9, "ratio": base.median_s / ours.median_s,
            "timings": {"ours": asdict(ours), "baseline": asdict(base)}}


def bench_memory(cfg, keys, kvs, report):
    nbytes = sum(kv.nbytes for kv in kvs)
    outs = [torch.empty_like(kv) for kv in kvs]
    dsts = [torch.empty_like(kv) for kv in kvs]
    cap = 2 * nbytes
    for name, alloc in (("L1", device_allocator(torch.device("cpu"), cap)), ("L2", ArenaAllocator(cap, pin=False))):
        tier = MemoryTier(name, cap, alloc, max_protected_bytes=0)
        rounds = [0]

        def put_round():
            """Store under fresh keys after dropping the previous round's: memory is reused as in service
            (the warm-up rounds take the first-touch page faults)."""
            r = rounds[0] = rounds[0] + 1
            tier.delete([ChunkKey((r - 1).to_bytes(16, "little"), k.chunk_hash) for k in keys])
            tier.put([(ChunkKey(r.to_bytes(16, "little"), k.chunk_hash), kv) for k, kv in zip(keys, kvs)])

        put, copy = _together(cfg, put_round, lambda: [d.copy_(s) for d, s in zip(dsts, kvs)])
        tier.put(list(zip(keys, kvs)))
        get, copy_get = _together(cfg, lambda: tier.read_into(list(zip(keys, outs))),
                                  lambda: [d.copy_(s) for d, s in zip(dsts, kvs)])
        report.rows += [_row(name, "put", nbytes, put, copy), _row(name, "get", nbytes, get, copy_get)]


def bench_disk(cfg, keys, blobs, report):
    root = cfg.disk_dir or tempfile.mkdtemp(prefix="bench-tiers-")
    nbytes = sum(len(b) for b in blobs)
    tier = DiskTier(os.path.join(root, "tier"), 4 * nbytes)
    plain = os.path.join(root, "plain")
    os.makedirs(plain, exist_ok=True)

    def plain_put():
        for i, b in enumerate(blobs):
            tmp = os.path.join(plain, f".{i}.tmp")
            with open(tmp, "wb") as f:
                f.write(b)
            os.replace(tmp, os.path.join(plain, f"{i}.bin"))

    def plain_get():
        out = []
        for i in range(len(blobs)):
            with open(os.path.join(plain, f"{i}.bin"), "rb") as f:
                out.append(f.read())
        return out

    items = list(zip(keys, blobs))
    put, base_put = _together(cfg, lambda: (tier.delete(keys), tier.put(items)), plain_put)
    get, base_get = _together(cfg, lambda: tier.get(keys), plain_get)
    assert tier.get(keys) == blobs, "disk tier returned other bytes"
    report.rows += [_row("L3", "put", nbytes, put, base_put), _row("L3", "get", nbytes, get, base_get)]
    tier.close()
    if cfg.disk_dir is None:
        shutil.rmtree(root, ignore_errors=True)


def bench_redis(cfg, keys, blobs, report):
    from lmcache_core.remote_url import parse_remote_url
    from lmcache_core.tiers.redis_tier import RedisTier

    url = parse_remote_url(cfg.remote_url)
    host, port = url.nodes[0] if url.nodes else (None, None)
    base_url = cfg.baseline_url or f"redis://{host}:{port}"
    plain = redis.Redis.from_url(base_url)
    if plain.info("cluster").get("cluster_enabled"):
        report.notes.append(f"baseline {base_url} is a cluster node: plain GETs may be MOVED; pass --baseline-url "
                            "of a standalone server")
    tier = RedisTier(url, max_part_size=64 * 2**20, batch_size=len(keys))
    nbytes = sum(len(b) for b in blobs)
    names = [f"bench:plain:{i}" for i in range(len(blobs))]

    def plain_put():
        pipe = plain.pipeline(transaction=False)
        for n, b in zip(names, blobs):
            pipe.set(n, b)
        pipe.execute()

    def plain_get():
        pipe = plain.pipeline(transaction=False)
        for n in names:
            pipe.get(n)
        return pipe.execute()

    items = list(zip(keys, blobs))
    put, base_put = _together(cfg, lambda: tier.put(items), plain_put)  # both overwrite: SET
    get, base_get = _together(cfg, lambda: tier.get(keys), plain_get)
    assert tier.get(keys) == blobs, "redis tier returned other bytes"
    label = "L4 cluster" if tier.is_cluster else "L4"
    report.rows += [_row(label, "put", nbytes, put, base_put), _row(label, "get", nbytes, get, base_get)]
    tier.delete(keys)
    plain.delete(*names)
    tier.close()


def bench_locks(cfg, report):
    from lmcache_core.singleflight import ChainedLocks, LocalLocks
    from lmcache_core.tiers.redis_client import RedisClient
    from lmcache_core.tiers.redis_locks import RedisLocks

    client = RedisClient(cfg.remote_url, batch_size=max(cfg.chunks, 1))
    locks = ChainedLocks(LocalLocks(), RedisLocks(client))
    owner, ttl, repeats = "bench-request", 30.0, cfg.repeats * 20
    calls = 2 * (repeats + 3)  # measure_together: 3 warm-up calls and the repeats, of each
    batches = iter([[ChunkKey(b"\x01" * 16, (i * cfg.chunks + j).to_bytes(16, "little")) for j in range(cfg.chunks)]
                    for i in range(calls)])
    used = []

    def old():
        keys = next(batches)
        used.extend(keys)
        if not locks.held_by_other(keys[:1], owner)[0]:
            locks.acquire(keys, owner, ttl)

    def new():
        keys = next(batches)
        used.extend(keys)
        locks.claim(keys, owner, ttl)

    t = measure_together({"new": new, "old": old}, repeats=repeats)
    errors = dict(locks.layers[1].errors)
    locks.release(used, owner)
    client.close()
    if errors:
        report.notes.append(f"lock step: Redis faults {errors}: the figures are not of a healthy server")
    report.rows.append({"tier": "L4 locks", "op": f"claim {cfg.chunks} missing chunks",
                        "ours_ms": t["new"].median_s * 1e3, "baseline_ms": t["old"].median_s * 1e3,
                        "ratio": t["old"].median_s / t["new"].median_s,
                        "timings": {"ours": asdict(t["new"]), "baseline": asdict(t["old"])}})


def bench_lookup(cfg, report):
    """lookup() of 512 chunks resident in L2, with tokens hashed in the call and with keys precomputed."""
    cs, n_chunks = cfg.chunk_size, 512
    spec = KVSpec("bench", "bfloat16", "flash_attn", 1, 2, 1, 8, cs)
    engine = CacheEngine(CacheConfig(chunk_size=cs, max_local_cpu_size=f"{n_chunks * cs * 64}B",
                                     prefetch_enabled=False), spec=spec, device="cpu")
    tokens = torch.randint(0, 50000, (n_chunks * cs,)).tolist()
    engine.store(tokens, torch.zeros(spec.chunk_shape(n_chunks * cs), dtype=torch.bfloat16))
    assert engine.lookup(tokens) == n_chunks * cs
    keys = engine.keys(tokens)
    with_hash = measure(lambda: engine.lookup(tokens), repeats=cfg.repeats * 4)
    keys_only = measure(lambda: engine.tiers.leading_run(keys), repeats=cfg.repeats * 4)
    report.rows.append({"tier": "L2", "op": "lookup 512 chunks", "ours_ms": keys_only.median_s * 1e3,
                        "with_hashing_ms": with_hash.median_s * 1e3})
    engine.close()


def run(cfg: Config) -> Report:
    from lmcache_core import codec

    report = Report("tiers", asdict(cfg))
    keys, kvs = _chunks(cfg)
    bench_memory(cfg, keys, kvs, report)
    blobs = [codec.encode(k.raw, kv, "none") for k, kv in zip(keys, kvs)]
    bench_disk(cfg, keys, blobs, report)
    if cfg.remote_url:
        bench_redis(cfg, keys, blobs, report)
        bench_locks(cfg, report)
    else:
        report.notes.append("L4 skipped: pass --remote-url (e.g. redis-cluster://127.0.0.1:7000,...)")
    bench_lookup(cfg, report)
    report.notes.append("lmcache backends skipped: lmcache is not importable here" if not _has_lmcache()
                        else "lmcache importable: backend comparison not implemented yet")
    return report


def _has_lmcache() -> bool:
    try:
        import lmcache  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None) -> Report:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--shape", choices=sorted(SHAPES), default=d.shape)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size)
    p.add_argument("--chunks", type=int, default=d.chunks)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--disk-dir", default=None, help="where L3 files go (default: a temp dir)")
    p.add_argument("--remote-url", default=None)
    p.add_argument("--baseline-url", default=None, help="a standalone Redis for the plain-client baseline")
    p.add_argument("--output", default=None)
    cfg = Config(**vars(p.parse_args(argv)))
    report = run(cfg)
    return emit(report, ["tier", "op", "MB", "ours_GBps", "baseline_GBps", "ratio", "ours_ms", "baseline_ms",
                         "with_hashing_ms"], cfg.output)


if __name__ == "__main__":
    main()
