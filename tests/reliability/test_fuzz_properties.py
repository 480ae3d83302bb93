"""Property-based fuzzing (hypothesis) of the three parsers of untrusted input.

- Chunk decoder (codec.decode / serde.unpack): valid chunks of every codec, dtype and shape, then damaged by
  a list of edits (bit flips, byte sets, truncation, insertion, header fields forged with the checksums
  recomputed or not, MAC stripped). Only CorruptChunkError may escape; damage without recomputed checksums
  is always detected; a decoded chunk always has the header's (and the reader's expected) shape and dtype.
- Config loader: CacheConfig.from_file on arbitrary text and on YAML built from the real keys with wrong
  values, tags and anchors; CacheConfig.load on arbitrary environment dicts. Only ConfigError may escape,
  no YAML tag ever runs code, and cache_secret never shows in repr() or in an error.
- URL parser: parse_remote_url on near-valid URLs from a grammar (schemes, user info with percent escapes,
  IPv4/IPv6/names, ports, db paths, TLS query options). Only ConfigError may escape; the password never
  shows in str(), repr() or an error; what parses round-trips.
tests/lmcache_core covers arbitrary bytes into the decoder, arbitrary text into the URL parser and
round trips of generated URLs; these strategies reach the deeper branches. The longer, coverage-guided
runs are fuzz/*.py (atheris), driven briefly by test_fuzz_atheris.py.
"""

import os
import string
import struct
import tempfile

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_core import codec, serde
from lmcache_core.config import ENV_VARS, KEYS, SECTIONS, CacheConfig
from lmcache_core.errors import ConfigError, CorruptChunkError
from lmcache_core.remote_url import parse_remote_url
from tests.reliability import forge

KEY = bytes(range(32))
SECRET = b"fuzz-secret-\x00\xff"


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- chunk decoder ---------------------------------------------------------------------------------------


@st.composite
def chunks(draw):
    """(blob, kv, secret) for a random valid chunk."""
    name = draw(st.sampled_from(["none", "zstd", "int8", "fp8", "int4"]))
    if name in ("none", "zstd"):
        dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn,
                                      torch.uint8]))
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=6)))
    else:
        dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
        mla = draw(st.booleans())
        n, d = draw(st.integers(1, 70)), 2 * draw(st.integers(1, 8))
        shape = (draw(st.integers(1, 2)), 1, n, d) if mla else (draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                                                                 n, draw(st.integers(1, 3)), d)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype.is_floating_point:
        kv = torch.randn(shape, generator=g).mul(4).to(dtype)
    else:
        kv = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    secret = draw(st.sampled_from([None, SECRET]))
    return codec.encode(KEY, kv, name, position=draw(st.integers(-1, 2**40)), secret=secret), kv, secret


_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("field"), st.sampled_from(sorted(set(forge.FIELDS) - {"key"})), st.integers(0, 2**64 - 1),
              st.booleans()),
    st.tuples(st.just("strip-mac"), st.booleans()),
)


def _apply(blob: bytes, edits) -> tuple[bytes, bool]:
    """The edited bytes, and whether a checksum was recomputed (a forger's edit, not plain damage)."""
    buf, forged = bytearray(blob), False
    for edit in edits:
        if not buf:
            break
        kind = edit[0]
        if kind == "flip":
            buf[edit[1] % len(buf)] ^= 1 << edit[2]
        elif kind == "set":
            buf[edit[1] % len(buf)] = edit[2]
        elif kind == "truncate":
            del buf[edit[1] % len(buf):]
        elif kind == "insert":
            buf[edit[1] % (len(buf) + 1): edit[1] % (len(buf) + 1)] = edit[2]
        elif kind == "field" and len(buf) >= serde.HEADER_BYTES:
            offset, fmt = forge.FIELDS[edit[1]]
            struct.pack_into(fmt, buf, offset, edit[2] % (1 << (8 * struct.calcsize(fmt))) if fmt != "<q"
                             else edit[2] % 2**63)
            if edit[3]:
                forge.fix_header_sum(buf)
                forged = True
        elif kind == "strip-mac" and len(buf) >= serde.HEADER_BYTES + serde.MAC_BYTES and buf[8] & serde.FLAG_MAC:
            del buf[serde.HEADER_BYTES: serde.HEADER_BYTES + serde.MAC_BYTES]
            struct.pack_into("<HI", buf, 6, serde.HEADER_BYTES, 0)
            if edit[1]:
                forge.fix_header_sum(buf)
                forged = True
    return bytes(buf), forged


@fuzz(400)
@given(chunks(), st.lists(_edit, min_size=1, max_size=4), st.booleans())
def test_decoder_only_raises_corrupt_chunk_error(chunk, edits, with_expect):
    blob, kv, secret = chunk
    bad, forged = _apply(blob, edits)
    expect = (tuple(kv.shape), kv.dtype) if with_expect else None
    try:
        out, _ = codec.decode(bad, KEY, secret=secret, expect=expect)
    except CorruptChunkError:
        return
    if bad == blob:
        return
    assert forged, f"damage without recomputed checksums was decoded: {edits}"
    header = serde.unpack_header(bad)
    assert tuple(out.shape) == header.shape and out.dtype == header.dtype
    if expect is not None:
        assert (tuple(out.shape), out.dtype) == expect
    assert secret is None, "a chunk edited without the secret passed the MAC"


@fuzz(150)
@given(chunks(), st.lists(_edit, min_size=1, max_size=4))
def test_unpack_only_raises_corrupt_chunk_error(chunk, edits):
    blob, _, secret = chunk
    bad, _ = _apply(blob, edits)
    try:
        header, payload = serde.unpack(bad, KEY, secret=secret)
    except CorruptChunkError:
        return
    assert len(payload) == header.payload_len <= len(bad)


@fuzz(100)
@given(chunks())
def test_valid_chunks_round_trip(chunk):
    blob, kv, secret = chunk
    out, _ = codec.decode(blob, KEY, secret=secret, expect=(tuple(kv.shape), kv.dtype))
    assert out.shape == kv.shape and out.dtype == kv.dtype
    header = serde.unpack_header(blob)
    if header.codec in ("none", "zstd"):
        assert torch.equal(out.contiguous().view(torch.uint8), kv.contiguous().view(torch.uint8))


# -- config loader -----------------------------------------------------------------------------------------

_SECRET_TEXT = "S3cr3t-never-printed-41f0"
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["5GB", "512MiB", "-1", "1e400", "0", "0B", "nan", "inf", "16",
                                           "redis://h:1", "rediss-cluster://a:1,b:2", "write_back", "zstd",
                                           "~/x", "\x00", "١٦", "1_0"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)
_key_names = st.sampled_from([k.name for k in KEYS]) | st.text(max_size=12)
# the secret text only ever goes under cache_secret (valid, or with a control character to make it fail)
_secret_entry = st.sampled_from([{}, {"cache_secret": _SECRET_TEXT}, {"cache_secret": _SECRET_TEXT + "\x01"}])
_mappings = st.builds(lambda d, secret: {**d, **secret}, st.dictionaries(_key_names, _values, max_size=6),
                      _secret_entry)
_yaml_docs = st.one_of(
    _mappings.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.dictionaries(st.sampled_from(SECTIONS), _mappings | _values, max_size=2).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=200),
    st.sampled_from([
        "!!python/object/apply:os.system ['touch /tmp/lmcache-fuzz-pwned']\n",
        "chunk_size: !!python/object/apply:builtins.eval ['16']\n",
        "? [a, b]\n: 1\n", "? {a: 1}\n: 2\n", "cache_config:\n  ? [x]\n  : 1\n", "<<: {chunk_size: 32}\n",
        "a: &x [*x]\n", "chunk_size: 16\nchunk_size: 32\n", "cache_config: 5\n", "--- 1\n--- 2\n",
        "\ufeffchunk_size: 16\n", "chunk_size: !!binary AAAA\n", f"cache_secret: \"{_SECRET_TEXT}\\x01\"\n",
        "max_local_cpu_size: 1e999\n", "remote_url: 'redis://:" + _SECRET_TEXT + "@h:99999'\n",
        "remote_url: 'redis://:" + _SECRET_TEXT + "@h:1/x'\n",
        "remote_url: 'redis://u:" + _SECRET_TEXT + "@[::1'\n",
    ]),
)


def _check_config(cfg) -> None:
    assert isinstance(cfg, CacheConfig)
    assert _SECRET_TEXT not in repr(cfg)


@fuzz(200)
@given(_yaml_docs)
def test_from_file_only_raises_config_error(text):
    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            _check_config(CacheConfig.from_file(path))
        except ConfigError as e:
            assert _SECRET_TEXT not in str(e), "a secret value reached an error message"
    finally:
        os.unlink(path)
    assert not os.path.exists("/tmp/lmcache-fuzz-pwned"), "a YAML tag ran code"


_env_names = st.one_of(st.sampled_from(sorted(ENV_VARS)), st.text(string.ascii_uppercase + "_", max_size=12).map(
    lambda s: "LMCACHE_" + s), st.text(max_size=10))
_env_values = st.one_of(st.text(max_size=30), st.sampled_from(
    ["", "none", "null", "true", "0", "5GB", "16", "1e309", "nan", "-0", "0x10", " 32 ", "redis://:pw@h",
     "rediss://h?ssl_cert_reqs=maybe", "１６"]))
# the secret only ever goes under cache_secret or as the password of remote_url (both masked)
_env_secret = st.sampled_from([{}, {"LMCACHE_CACHE_SECRET": _SECRET_TEXT},
                               {"LMCACHE_CACHE_SECRET": _SECRET_TEXT + "\x01"},
                               {"LMCACHE_REMOTE_URL": f"redis://:{_SECRET_TEXT}@h:0"},
                               {"LMCACHE_REMOTE_URL": f"redis://u:{_SECRET_TEXT}@h:1/x"},
                               {"LMCACHE_REMOTE_URL": f"rediss://:{_SECRET_TEXT}@h?ssl_cert_reqs=x"}])


@fuzz(300)
@given(st.dictionaries(_env_names, _env_values, max_size=6), _env_secret)
def test_load_with_arbitrary_env_only_raises_config_error(env, secret):
    env.pop("LMCACHE_CONFIG_FILE", None)  # a path to read: the file fuzzing above covers what it reads
    env.update(secret)
    try:
        _check_config(CacheConfig.load(env=env))
    except ConfigError as e:
        assert _SECRET_TEXT not in str(e)


# -- URL parser --------------------------------------------------------------------------------------------

_PASSWORD = "pw-9f8e7d6c"
_pct = st.sampled_from(["%40", "%3A", "%25", "%2F", "%zz", "%f", "%ff", "%C3%A9", "%e2%82", "%00", "+"])
_user_part = st.lists(st.sampled_from(list(string.ascii_letters + string.digits + "-._~!$&'()*+;=")) | _pct,
                      max_size=5).map("".join)
_host = st.one_of(
    st.sampled_from(["127.0.0.1", "localhost", "redis.example.com", "[::1]", "::1", "[fe80::1%eth0]",
                     "[::ffff:1.2.3.4]",
                     "256.1.1.1", "1.2.3", "01.2.3.4", "a..b", "-a", "a_b", "", "[]", "[::1", "xn--bcher-kva.de"]),
    st.lists(st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=6), min_size=1,
             max_size=3).map(".".join))
_port = st.one_of(st.just(""), st.integers(0, 70000).map(lambda p: f":{p}"),
                  st.sampled_from([":", ":-1", ":١٢", ":0x10", ":99999999999", ": 1"]))
_query_item = st.tuples(
    st.sampled_from(["db", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname",
                     "ssl", "timeout", ""]),
    st.sampled_from(["", "0", "1", "required", "none", "Optional", "true", "no", "maybe", "/tmp/ca.pem", "%zz",
                     "a+b", "%2Fetc"])).map(lambda kv: "=".join(kv))


@st.composite
def near_urls(draw):
    scheme = draw(st.sampled_from(["redis", "rediss", "unix", "redis-cluster", "rediss-cluster", "Redis", "http",
                                   "redis+cluster", ""]))
    auth = draw(st.sampled_from(["", "user@", f":{_PASSWORD}@", f"user:{_PASSWORD}@", f"u:{_PASSWORD}@x@",
                                 f":{_PASSWORD}%zz@", f":{_PASSWORD}#x@", f"u:{_PASSWORD}/x@", f":x/{_PASSWORD}@",
                                 f":{_PASSWORD}?db=1@", f":a{_PASSWORD}?{_PASSWORD}=1@"])
                | _user_part.map(lambda u: f"{u}:{_PASSWORD}@"))
    if scheme == "unix":
        where = draw(st.sampled_from(["/run/redis.sock", "", "relative.sock", "/a%20b", "/x\x00y", "//h/p"]))
    else:
        where = ",".join(draw(st.lists(st.tuples(_host, _port).map("".join), min_size=1, max_size=3)))
        where += draw(st.sampled_from(["", "/", "/0", "/3", "/x", "//", "/1/2"]))
    query = draw(st.lists(_query_item, max_size=3).map("&".join))
    tail = draw(st.sampled_from(["", "#frag", " ", "\n"]))
    return f"{scheme}://{auth}{where}" + (f"?{query}" if query else "") + tail


@fuzz(1500)
@given(near_urls())
def test_url_parser_only_raises_config_error(url):
    try:
        u = parse_remote_url(url)
    except ConfigError as e:
        assert _PASSWORD not in str(e), f"the password reached an error message: {e}"
        return
    if u.password is not None and len(u.password) >= 4:  # (the text may also sit in a unix socket path)
        assert u.password not in str(u) and u.password not in repr(u)
    assert parse_remote_url(u.to_url(show_password=True)) == u
    u.redis_kwargs()  # never raises on what parsed


def test_yaml_tags_never_run_code(tmp_path):
    """The loader is a SafeLoader: Python tags are errors, not calls (the fuzz corpus above includes them)."""
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"chunk_size: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        CacheConfig.from_file(cfg)
    assert not marker.exists()
