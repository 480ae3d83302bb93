"""Signed chunks (cache_secret): a party that can write to the shared Redis or the cache directory but lacks
the secret can cause misses, never make an engine load its bytes.

- Every stored chunk (L3 file, L4 value) carries a keyed blake2b MAC that verifies with the secret only.
- Under a real key, in Redis and on disk: an unsigned chunk of the attacker's KV, one signed with a wrong
  secret, another key's genuinely signed chunk (replay), the genuine chunk with its payload replaced and the
  checksum fixed, the MAC stripped (flag cleared, header checksum fixed: a downgrade), the MAC zeroed, and
  the whole corruption generator including relabellings that give well-formed chunks (tests/reliability/
  forge.py, well_formed=True). Each is a miss, counted as corrupt and deleted; the attacker's bytes are
  never returned.
- The same unsigned forgery IS served by an engine without cache_secret: the threat the secret answers.
- The secret (and the Redis password) never appear in logs of a run with failing verifications, in
  repr()/str() of the config, in a ConfigError, in stats, or in stored bytes.
tests/lmcache_core covers the MAC in the codec alone and an unsigned forgery written by another engine.
"""

import logging
import random

import pytest
import redis
import torch

from lmcache_core import codec, serde
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
from lmcache_core.tiers.redis_tier import head_name
from tests.reliability import forge
from tests.reliability.common import CS, chunk_files, engine, kv_for, same_bytes, tokens

SECRET = "team-secret-Q7z!x9"
PASSWORD = "redis-pw-K2v8"
SEQS = 4


@pytest.fixture
def signed(tmp_path, redis_node_factory):
    node = redis_node_factory(password=PASSWORD)
    url = f"redis://:{PASSWORD}@{node.host}:{node.port}"
    l3 = tmp_path / "l3"
    seqs = [tokens(2 * CS, seed=800 + s) for s in range(SEQS)]
    kvs = [kv_for(2 * CS, seed=800 + s) for s in range(SEQS)]
    writer = engine(l2_chunks=1, local_cache_dir=str(l3), remote_url=url, cache_secret=SECRET)
    lossy = engine(l2_chunks=1, local_cache_dir=str(l3), remote_url=url, cache_secret=SECRET, codec="int8")
    for s in range(SEQS):  # sequence 2 in int8: its forgeries include int8 <-> fp8 relabellings
        (lossy if s == 2 else writer).store(seqs[s], kvs[s])
    writer.flush()
    lossy.flush()
    lossy.close()
    check = engine(l2_chunks=1, remote_url=url, cache_secret=SECRET)
    kvs = [check.retrieve(seqs[s])[1] for s in range(SEQS)]  # what a correct read returns (int8: lossy)
    check.close()
    raw = redis.Redis(host=node.host, port=node.port, password=PASSWORD)
    made = [writer]

    def reader(tier: str, secret: str | None = SECRET):
        kw = {"local_cache_dir": str(l3)} if tier == "L3" else {"remote_url": url}
        e = engine(l2_chunks=1, cache_secret=secret, **kw)
        made.append(e)
        return e

    yield writer, reader, seqs, kvs, l3, raw
    for e in made:
        e.close()
    raw.close()


def _path(l3, key):
    return l3 / key.chunk_hash.hex()[:2] / f"{key.name}.lmc"


def test_every_stored_chunk_is_signed(signed):
    writer, _, seqs, _, l3, raw = signed
    keys = [k for s in seqs for k in writer.keys(s)]
    blobs = [_path(l3, k).read_bytes() for k in keys] + [raw.get(head_name(k)) for k in keys]
    assert len(blobs) == 2 * 2 * SEQS and len(chunk_files(l3)) == 2 * SEQS
    for i, blob in enumerate(blobs):
        key = keys[i % len(keys)]
        header, _ = serde.unpack(blob, key.raw, secret=SECRET.encode())
        assert header.has_mac
        with pytest.raises(Exception, match="MAC mismatch"):
            serde.unpack(blob, key.raw, secret=b"another secret")
        assert SECRET.encode() not in blob


def _forgeries(rng, key, genuine: bytes, other_genuine: bytes, evil: torch.Tensor):
    yield "unsigned", codec.encode(key.raw, evil, "none")
    yield "wrong secret", codec.encode(key.raw, evil, "zstd", secret=b"guessed-secret")
    yield "replayed other key", other_genuine
    evil_payload = codec.encode(key.raw, evil, "none")[serde.HEADER_BYTES:]
    yield "payload replaced, checksum fixed", forge.reforge(genuine, payload=evil_payload,
                                                            dtype=forge.read(genuine, "dtype"), codec=0)
    stripped = bytearray(genuine[:128] + genuine[160:])
    stripped[6:12] = (128).to_bytes(2, "little") + (0).to_bytes(4, "little")
    forge.fix_header_sum(stripped)
    yield "MAC stripped (downgrade)", bytes(stripped)
    yield "MAC zeroed", genuine[:128] + bytes(32) + genuine[160:]
    yield from forge.corruptions(rng, genuine, [other_genuine], well_formed=True)


@pytest.mark.parametrize("tier", ["L3", "L4"])
def test_forged_chunks_under_real_keys_are_only_misses(signed, tier):
    writer, reader, seqs, kvs, l3, raw = signed
    rng = random.Random(9)
    r = reader(tier)
    stats = r.tiers.byte_tiers[0].stats
    evil = torch.full_like(kvs[0][:, :, :CS], 7.0)
    tried = 0
    for target, (s, chunk) in enumerate([(0, 0), (1, 1), (2, 0)]):
        key = writer.keys(seqs[s])[chunk]
        genuine = _path(l3, key).read_bytes()
        other = _path(l3, writer.keys(seqs[3])[0]).read_bytes()
        for category, bad in _forgeries(rng, key, genuine, other, evil):
            if bad == genuine:
                continue
            if tier == "L3":
                _path(l3, key).write_bytes(bad)
            else:
                raw.set(head_name(key), bad)
            corrupt = stats.corrupt
            n, out = r.retrieve(seqs[s])
            assert n == chunk * CS, f"{tier} {category}: a forged chunk was served"
            if n:
                assert same_bytes(out, kvs[s][:, :, :n])
            if tier == "L4" and len(bad) == 28:  # the tier's multi-part manifest size: rejected as incomplete
                raw.delete(head_name(key))
            else:
                assert stats.corrupt == corrupt + 1, f"{tier} {category}: not counted"
                gone = not _path(l3, key).exists() if tier == "L3" else not raw.exists(head_name(key))
                assert gone, f"{tier} {category}: the forged chunk was not deleted"
            for t in r.tiers.memory:
                t.clear()
            tried += 1
        # the genuine chunk is still accepted
        if tier == "L3":
            _path(l3, key).write_bytes(genuine)
        else:
            raw.set(head_name(key), genuine)
        n, out = r.retrieve(seqs[s])
        assert n == 2 * CS and same_bytes(out, kvs[s])
        for t in r.tiers.memory:
            t.clear()
    print(f"\n[signed {tier}] {tried} forged chunks under real keys: all misses")
    assert tried >= 100


def test_without_cache_secret_a_writer_can_poison(signed):
    """The threat model's other half: without cache_secret, a chunk that is well formed for the key is
    served, whoever wrote it (a collision-resistant key does not stop a writer who knows a key name)."""
    writer, reader, seqs, kvs, _, raw = signed
    key = writer.keys(seqs[0])[0]
    evil = torch.full_like(kvs[0][:, :, :CS], 7.0)
    raw.set(head_name(key), codec.encode(key.raw, evil, "none"))
    n, out = reader("L4", secret=None).retrieve(seqs[0])
    assert n == 2 * CS and same_bytes(out[:, :, :CS], evil), "expected the unsigned forgery to be served"
    n, _ = reader("L4").retrieve(seqs[0])  # with the secret: a miss
    assert n == 0


def test_secret_never_in_logs_repr_errors_or_stats(signed, caplog, tmp_path, monkeypatch):
    caplog.set_level(logging.DEBUG)
    writer, reader, seqs, kvs, l3, raw = signed
    for tier in ("L3", "L4"):  # failing verifications: logged warnings
        key = writer.keys(seqs[1])[0]
        forged = codec.encode(key.raw, kvs[1][:, :, :CS], "none", secret=b"guessed")
        _path(l3, key).write_bytes(forged) if tier == "L3" else raw.set(head_name(key), forged)
        r = reader(tier)
        assert r.retrieve(seqs[1]) == (0, None)
    texts = [caplog.text, repr(writer.config), str(writer.config), repr(writer.stats()),
             repr(writer.config.remote_url), str(writer.config.remote_url)]
    # the config loader, from a file and from the environment, and its errors
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"cache_config:\n  cache_secret: {SECRET}\n  remote_url: redis://:{PASSWORD}@h:1\n")
    texts += [repr(CacheConfig.from_file(cfg_file)),
              repr(CacheConfig.load(env={"LMCACHE_CACHE_SECRET": SECRET}))]
    for bad in ({"LMCACHE_CACHE_SECRET": SECRET + "\x01"},
                {"LMCACHE_CACHE_SECRET": SECRET, "LMCACHE_CHUNK_SIZE": "17"},
                {"LMCACHE_REMOTE_URL": f"redis://:{PASSWORD}@h:0"}):
        with pytest.raises(ConfigError) as info:
            CacheConfig.load(env=bad)
        texts.append(str(info.value))
    with pytest.raises(ConfigError) as info:
        CacheConfig(cache_secret=7)
    texts.append(str(info.value))
    assert any("failed verification" in t for t in texts), "the run did not log a failed verification"
    for t in texts:
        assert SECRET not in t and PASSWORD not in t, f"a secret leaked: {t[:300]}"
