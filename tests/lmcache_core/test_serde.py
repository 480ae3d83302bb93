"""The stored chunk format: exact round trips, and every corruption is a CorruptChunkError (a miss)."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_core import codec, serde
from lmcache_core.errors import CorruptChunkError
from tests.helpers import assert_bytes_equal, real_kv

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def small_blob(secret=None):
    kv = torch.randn(2, 2, 4, 1, 4).to(torch.bfloat16)
    return kv, codec.encode(KEY, kv, "none", position=128, secret=secret)


@pytest.mark.parametrize("name", ["none", "zstd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn], ids=str)
def test_lossless_codecs_round_trip_bit_exact(name, dtype):
    raw = torch.randint(0, 256, (2 * 2 * 64 * 3 * 16 * torch.empty((), dtype=dtype).element_size(),),
                        dtype=torch.uint8)
    kv = raw.view(dtype).view(2, 2, 64, 3, 16)  # every bit pattern: NaN payloads, -0.0, inf
    blob = codec.encode(KEY, kv, name, position=7)
    out, position = codec.decode(blob, KEY)
    assert position == 7
    assert_bytes_equal(out, kv, name)


@pytest.mark.parametrize("name", ["none", "zstd", "int8"])
def test_decode_into_out_equals_decode(name):
    """out=: decoded straight into a caller's buffer (contiguous CPU) or copied in (any other tensor)."""
    kv = torch.randn(2, 2, 64, 3, 16).to(torch.bfloat16)
    blob = codec.encode(KEY, kv, name, position=3)
    expected, _ = codec.decode(blob, KEY)
    out = torch.full_like(kv, 7.0)
    got, position = codec.decode(blob, KEY, out=out, expect=(kv.shape, kv.dtype))
    assert got is out and position == 3
    assert_bytes_equal(out, expected, f"{name} into out")
    strided = torch.full((2, 2, 3, 64, 16), 7.0, dtype=torch.bfloat16).transpose(2, 3)  # non-contiguous
    assert codec.decode(blob, KEY, out=strided)[0] is strided
    assert_bytes_equal(strided.contiguous(), expected, f"{name} into a strided out")


@pytest.mark.parametrize("name", ["none", "zstd"])
def test_decode_never_writes_out_for_a_bad_chunk(name):
    kv = torch.randn(2, 2, 8, 1, 16).to(torch.bfloat16)
    blob = bytearray(codec.encode(KEY, kv, name))
    blob[-1] ^= 1
    out = torch.zeros_like(kv)
    with pytest.raises(CorruptChunkError, match="checksum"):
        codec.decode(bytes(blob), KEY, out=out)
    assert not out.any()
    with pytest.raises(CorruptChunkError, match="output buffer"):
        codec.decode(codec.encode(KEY, kv, name), KEY, out=torch.zeros(2, 2, 8, 1, 8, dtype=torch.bfloat16))


def test_zstd_compresses_real_kv():
    kv = real_kv()[:, :, :256]  # [L, 2, T, H, D]
    blob = codec.encode(KEY, kv, "zstd", level=3)
    assert kv.nbytes / len(blob) > 1.4, f"ratio {kv.nbytes / len(blob):.2f}"
    assert_bytes_equal(codec.decode(blob, KEY)[0], kv, "real kv")


def test_zstd_stores_raw_bytes_when_they_barely_shrink():
    """min_ratio: a chunk zstd shrinks less than that is stored raw (header codec none), exactly; real bf16
    KV (1.45x) stays compressed at the default 1.25."""
    kv = torch.randn(2, 2, 64, 3, 16)  # float32 noise: only the exponent plane compresses (~1.1x)
    kept = codec.encode(KEY, kv, "zstd", min_ratio=1.0)
    raw = codec.encode(KEY, kv, "zstd", min_ratio=1.25)
    assert serde.unpack_header(kept).codec == "zstd" and len(kept) < kv.nbytes < 1.25 * len(kept)
    assert serde.unpack_header(raw).codec == "none" and len(raw) > kv.nbytes
    for blob in (kept, raw):
        assert_bytes_equal(codec.decode(blob, KEY)[0], kv, serde.unpack_header(blob).codec)
    real = real_kv()[:, :, :256]
    assert serde.unpack_header(codec.encode(KEY, real, "zstd", level=1, min_ratio=1.25)).codec == "zstd"


def test_every_single_bit_flip_is_detected():
    _, blob = small_blob()
    for bit in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptChunkError):
            codec.decode(bytes(bad), KEY)


def test_every_truncation_and_extension_is_detected():
    _, blob = small_blob()
    for cut in range(len(blob)):
        with pytest.raises(CorruptChunkError):
            codec.decode(blob[:cut], KEY)
    with pytest.raises(CorruptChunkError, match="length mismatch"):
        codec.decode(blob + b"\0", KEY)


def test_a_chunk_under_another_key_is_rejected():
    _, blob = small_blob()
    with pytest.raises(CorruptChunkError, match="key mismatch"):
        codec.decode(blob, OTHER_KEY)


def _reforge(blob: bytes, offset: int, fmt: str, value) -> bytes:
    """Change one header field and fix the header checksum, as a deliberate forger would."""
    bad = bytearray(blob)
    struct.pack_into(fmt, bad, offset, value)
    fixed = serde._FIXED.size
    import xxhash

    struct.pack_into("<Q", bad, fixed, xxhash.xxh3_64_intdigest(bytes(bad[:fixed])))
    return bytes(bad)


@pytest.mark.parametrize("offset,fmt,value,match", [
    (96, "<Q", 2**62, "length mismatch"),  # a huge section length: no allocation, just a mismatch
    (48, "<I", 2**31, "section holds"),  # a shape that does not match the payload
    (44, "<B", 200, "bad dtype"),
    (46, "<B", 99, "bad dtype/codec"),
    (45, "<B", 0, "bad dtype/codec/ndim"),
    (4, "<H", 9, "unsupported format version"),
    (8, "<I", 2, "bad flags"),
])
def test_forged_headers_are_rejected_without_trusting_lengths(offset, fmt, value, match):
    _, blob = small_blob()
    with pytest.raises(CorruptChunkError, match=match):
        codec.decode(_reforge(blob, offset, fmt, value), KEY)


def test_forged_zstd_frame_cannot_expand_past_the_declared_shape():
    import zstandard

    kv = torch.zeros(2, 2, 4, 1, 4, dtype=torch.bfloat16)
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 24))  # 16 MiB of zeros in a few KB
    blob = serde.pack(KEY, kv.dtype, kv.shape, "zstd", (bomb,))
    with pytest.raises(CorruptChunkError, match="zstd"):
        codec.decode(blob, KEY)


def test_mac_binds_chunks_to_the_secret():
    kv, signed = small_blob(secret=b"s3cret")
    out, _ = codec.decode(signed, KEY, secret=b"s3cret")
    assert_bytes_equal(out, kv, "signed")
    with pytest.raises(CorruptChunkError, match="MAC mismatch"):
        codec.decode(signed, KEY, secret=b"other")
    _, unsigned = small_blob()
    with pytest.raises(CorruptChunkError, match="unsigned chunk"):
        codec.decode(unsigned, KEY, secret=b"s3cret")
    forged = codec.encode(KEY, torch.ones_like(kv), "none", secret=b"guess")  # a writer without the secret
    with pytest.raises(CorruptChunkError, match="MAC mismatch"):
        codec.decode(forged, KEY, secret=b"s3cret")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_reader(data):
    try:
        codec.decode(data, KEY)
    except CorruptChunkError:
        pass
