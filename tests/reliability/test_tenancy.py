"""Tenant isolation and what storage names reveal.

- The per-call `namespace=` and the config's `cache_salt` enter the chunk hash: one tenant never sees
  another's entries in L2 (same engine), in L3 files or in L4 values (fresh engines that share the
  directory and the Redis, each tier also on its own), in prefix or segment mode, even when both stored the
  same tokens with different KV. Salt and namespace cannot be traded for each other.
- Names: after storing (and claiming, which writes lock keys), no L3 file or directory name and no Redis
  key contains the decimal or hex of any two consecutive token ids (several encodings and separators), the
  prompt text, or the namespace; no stored value contains the tokens' bytes; no log line does either.
tests/lmcache_core covers namespaces on the memory tiers of one engine.
"""

import itertools
import logging
import re

import numpy as np
import pytest
import redis

from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
from tests.reliability.common import CS, all_names_under, chunk_files, engine, kv_for, same_bytes, tokens

NS_A, NS_B = "tenant-a", "tenant-b"


@pytest.fixture
def shared(tmp_path, redis_node):
    """Engine factories over one L3 directory and one Redis: both tiers, or either alone."""
    made = []
    l3 = str(tmp_path / "l3")

    def make(tiers: str = "L3+L4", l2_chunks: int = 1, **cfg):
        kw = {}
        if "L3" in tiers:
            kw["local_cache_dir"] = l3
        if "L4" in tiers:
            kw["remote_url"] = redis_node.url
        e = engine(l2_chunks=l2_chunks, **kw, **cfg)
        made.append(e)
        return e

    raw = redis.Redis(host=redis_node.host, port=redis_node.port)
    yield make, tmp_path / "l3", raw
    for e in made:
        e.close()
    raw.close()


def _names(keys) -> set[str]:
    return {k.name for k in keys}


def _stored_names(l3, raw) -> tuple[set[str], set[str]]:
    files = {p.name.removesuffix(".lmc") for p in chunk_files(l3)}
    heads = {m.group(1) for k in raw.keys("lmc:v1:*") if (m := re.match(r"lmc:v1:\{(.+)\}$", k.decode()))}
    return files, heads


def test_namespaces_never_see_each_other_in_any_tier(shared):
    make, l3, raw = shared
    toks = tokens(4 * CS, seed=700)
    kv_a, kv_b = kv_for(4 * CS, seed=701), kv_for(4 * CS, seed=702)
    e = make(l2_chunks=8)
    e.store(toks, kv_a, namespace=NS_A)
    e.store(toks[:2 * CS], kv_a[:, :, :2 * CS], namespace=NS_A, mode="segment")
    # L2, the same engine
    assert e.tiers.memory[0].usage().entries == 6
    for ns in (NS_B, None, ""):
        assert e.lookup(toks, namespace=ns) == 0 and e.retrieve(toks, namespace=ns) == (0, None), ns
        assert e.retrieve(toks[:2 * CS], namespace=ns, mode="segment") == (0, None), ns
    n, out = e.retrieve(toks, namespace=NS_A)
    assert n == 4 * CS and same_bytes(out, kv_a)
    e.flush()
    keys_a, keys_b = e.keys(toks, namespace=NS_A), e.keys(toks, namespace=NS_B)
    assert not _names(keys_a) & _names(keys_b) and not _names(keys_a) & _names(e.keys(toks))
    files, heads = _stored_names(l3, raw)
    assert _names(keys_a) <= files and _names(keys_a) <= heads
    assert not _names(keys_b) & (files | heads)
    # L3 alone, L4 alone, and both: fresh engines with nothing in memory
    for tiers in ("L3", "L4", "L3+L4"):
        r = make(tiers)
        for ns in (NS_B, None):
            assert r.lookup(toks, namespace=ns) == 0 and r.retrieve(toks, namespace=ns) == (0, None), (tiers, ns)
        n, out = r.retrieve(toks, namespace=NS_A)
        assert n == 4 * CS and same_bytes(out, kv_a), tiers
    # tenant B stores the same tokens with other KV, through another engine: each reads only its own
    b = make()
    b.store(toks, kv_b, namespace=NS_B)
    b.flush()
    for tiers in ("L3", "L4"):
        r = make(tiers)
        for ns, kv in ((NS_A, kv_a), (NS_B, kv_b)):
            n, out = r.retrieve(toks, namespace=ns)
            assert n == 4 * CS and same_bytes(out, kv), (tiers, ns)
        assert r.stats()[tiers]["corrupt"] == 0


def test_cache_salt_separates_instances_sharing_disk_and_redis(shared):
    make, l3, raw = shared
    toks = tokens(3 * CS, seed=710)
    kv_1, kv_2 = kv_for(3 * CS, seed=711), kv_for(3 * CS, seed=712)
    org1 = make(cache_salt="org-1")
    org1.store(toks, kv_1)
    org1.flush()
    org2 = make(cache_salt="org-2")
    for ns in (None, "org-1", NS_A):
        assert org2.lookup(toks, namespace=ns) == 0 and org2.retrieve(toks, namespace=ns) == (0, None)
    org2.store(toks, kv_2)
    org2.flush()
    files, heads = _stored_names(l3, raw)
    assert files == heads and len(files) == 6, "each salt wrote its own 3 chunks to each shared tier"
    for salt, kv in (("org-1", kv_1), ("org-2", kv_2)):
        for tiers in ("L3", "L4"):
            n, out = make(tiers, cache_salt=salt).retrieve(toks)
            assert n == 3 * CS and same_bytes(out, kv), (salt, tiers)
    # a salt and a namespace cannot stand in for each other: the key salts with cache_salt + NUL + namespace,
    # and cache_salt may not hold a NUL (or any control character)
    pairs = [("a", None), ("", "a"), ("a", "b"), ("ab", None), ("", "ab"), ("a", "b\x00c"), ("", "a\x00b")]
    keys = {pair: make("", cache_salt=pair[0]).keys(toks, namespace=pair[1])[0] for pair in pairs}
    assert len({k.name for k in keys.values()}) == len(pairs), keys
    with pytest.raises(ConfigError, match="control characters"):
        CacheConfig(cache_salt="a\x00b")


PROMPT = "Patient Jane Roe, MRN 4417-2291, asks about her HIV test result of 2024-03-09."


def _needles(toks: list[int]) -> set[str]:
    """Encodings of every 2-token window (and each token's decimal) that a leaky key scheme would show."""
    out = {PROMPT, PROMPT.encode().hex(), PROMPT.replace(" ", "_"), "4417-2291"}
    out |= {str(t) for t in toks}  # 10-digit decimals: no hex digest contains one by chance (p ~ 1e-11)
    for a, b in itertools.pairwise(toks):
        for sep in ("", ",", "-", "_", ":", " ", ".", ", ", "|"):
            out.add(f"{a}{sep}{b}")
            out |= {f"{a:x}{sep}{b:x}", f"{a:08x}{sep}{b:08x}", f"{a:X}{sep}{b:X}", f"0x{a:x}{sep}0x{b:x}"}
        out |= {np.array([a, b], dtype=order).tobytes().hex() for order in ("<u4", ">u4", "<u8")}
    return out


def test_names_values_and_logs_hold_no_tokens_or_text(shared, caplog):
    make, l3, raw = shared
    namespace = "tenant-hospital-north"
    toks = tokens(4 * CS, seed=720)
    # the prompt's characters as token ids (distinctive values, and a text a leak would show)
    prompt_ids = [3_200_000_000 + ord(c) for c in PROMPT][: 4 * CS]
    caplog.set_level(logging.DEBUG)
    e = make(l2_chunks=1)
    for seq, seed in ((toks, 721), (prompt_ids, 722)):
        e.store(seq, kv_for(4 * CS, seed=seed), namespace=namespace)
        e.store(seq, kv_for(4 * CS, seed=seed), mode="segment")
    claim = e.claim(tokens(4 * CS, seed=723), owner="req-1")  # lock keys in Redis, with the chunk names
    assert claim.state == "compute"
    e.flush()
    names = all_names_under(l3) + [k.decode() for k in raw.keys("*")]
    values = [p.read_bytes() for p in chunk_files(l3)] + [raw.get(k) for k in raw.keys("lmc:v1:*")]
    assert len(chunk_files(l3)) == 16 and any(n.startswith("lmc:lock:") for n in names)
    needles = _needles(toks) | _needles(prompt_ids) | {namespace}
    shape = re.compile(r"[0-9a-f]{2}|[0-9a-f]{32}-[0-9a-f]{32}\.lmc|lmc:(v1|lock):\{[0-9a-f]{32}-[0-9a-f]{32}\}")
    assert not [n for n in names if not shape.fullmatch(n)], "a storage name is more than hex digests"
    for needle in needles:
        hits = [n for n in names if needle.lower() in n.lower()]
        assert not hits, f"{needle!r} appears in storage names {hits[:3]}"
    token_bytes = {bytes.fromhex(n) for n in needles if re.fullmatch(r"[0-9a-f]{16}", n)}
    token_bytes |= {PROMPT.encode(), namespace.encode()}
    for value in values:
        assert not any(b in value for b in token_bytes), "a stored value holds token ids or text"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not any(needle in logged for needle in needles | {namespace}), "a log line holds tokens or text"
    e.release(tokens(4 * CS, seed=723), owner="req-1")
