"""The stored chunk format: a fixed binary header, an optional MAC, then the payload. Never pickle.

Stored bytes may come from a shared Redis written by anyone, so the reader trusts nothing: every field is
range-checked before use, lengths are compared with the bytes actually present (a forged length cannot make
us allocate), the header and the payload carry checksums, and the key in the header must be the key asked
for (a chunk copied under another key is caught). Any failure is a `CorruptChunkError`: a miss.

Layout (little-endian), 128 bytes, then 32 bytes of MAC when flag bit 0 is set, then the payload:

| offset | field | type |
|---|---|---|
| 0 | magic `LMCK` | 4s |
| 4 | format version (1) | u16 |
| 6 | header length incl. MAC | u16 |
| 8 | flags (bit 0: MAC present) | u32 |
| 12 | chunk key (spec fingerprint + chunk hash) | 32s |
| 44 | dtype code, ndim, codec code, reserved | 4 x u8 |
| 48 | shape, unused dims 0 | 6 x u32 |
| 72 | position of the chunk's first token when computed (-1: unknown) | i64 |
| 80 | codec parameters | 4 x u32 |
| 96 | section lengths (payload = section 0 then section 1) | 2 x u64 |
| 112 | payload checksum: xxh3-64 of the payload | u64 |
| 120 | header checksum: xxh3-64 of bytes 0..120 | u64 |

MAC (with `cache_secret`): keyed blake2b-256 over the 128 header bytes and the payload.
"""

import hashlib
import hmac
import struct
from dataclasses import dataclass

import torch
import xxhash

from .errors import CorruptChunkError
from .keys import KEY_BYTES

MAGIC = b"LMCK"
VERSION = 1
_FIXED = struct.Struct("<4sHHI32s4B6Iq4I2QQ")
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = _FIXED.size + _CHECKSUM.size  # 128
MAC_BYTES = 32
MAX_DIMS = 6
FLAG_MAC = 1

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8,
          torch.int8)
_DTYPE_CODE = {dt: i + 1 for i, dt in enumerate(DTYPES)}
_CODE_DTYPE = {i: dt for dt, i in _DTYPE_CODE.items()}
# How a stored chunk's payload is coded (lmcache_core.codec); the lossy three are kernels.quant.QUANT_CODECS.
CHUNK_CODECS = ("none", "zstd", "int8", "fp8", "int4")
_CODEC_CODE = {name: i for i, name in enumerate(CHUNK_CODECS)}


@dataclass(frozen=True)
class Header:
    key: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: str
    position: int
    params: tuple[int, int, int, int]
    sections: tuple[int, int]
    has_mac: bool

    @property
    def payload_len(self) -> int:
        return self.sections[0] + self.sections[1]

    @property
    def header_len(self) -> int:
        return HEADER_BYTES + (MAC_BYTES if self.has_mac else 0)


def _mac(secret: bytes, header: bytes, payload) -> bytes:
    m = hashlib.blake2b(key=secret, digest_size=MAC_BYTES, person=b"lmcache-chunk")
    m.update(header)
    m.update(payload)
    return m.digest()


def pack(key: bytes, dtype: torch.dtype, shape, codec: str, sections: tuple[bytes, bytes] | tuple[bytes],
         *, position: int = -1, params=(0, 0, 0, 0), secret: bytes | None = None) -> bytes:
    """Header + optional MAC + payload sections, as one bytes object."""
    assert len(key) == KEY_BYTES, f"key must be {KEY_BYTES} bytes, got {len(key)}"
    assert len(shape) <= MAX_DIMS, f"at most {MAX_DIMS} dims, got {shape}"
    sections = tuple(sections) + (b"",) * (2 - len(sections))
    payload = b"".join(sections)
    dims = tuple(shape) + (0,) * (MAX_DIMS - len(shape))
    fixed = _FIXED.pack(MAGIC, VERSION, HEADER_BYTES + (MAC_BYTES if secret else 0), FLAG_MAC if secret else 0,
                        key, _DTYPE_CODE[dtype], len(shape), _CODEC_CODE[codec], 0, *dims, position, *params,
                        len(sections[0]), len(sections[1]), xxhash.xxh3_64_intdigest(payload))
    header = fixed + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(fixed))
    mac = _mac(secret, header, payload) if secret else b""
    return header + mac + payload


def unpack_header(buf, expected_key: bytes | None = None) -> Header:
    """Parse and check the header of `buf` (bytes/memoryview); raises CorruptChunkError."""
    view = memoryview(buf)
    if len(view) < HEADER_BYTES:
        raise CorruptChunkError(f"truncated header: {len(view)} bytes, need {HEADER_BYTES}")
    fields = _FIXED.unpack_from(view)
    (magic, version, header_len, flags, key, dtype_code, ndim, codec_code, _reserved, *rest) = fields
    dims, (position, *params), (sec0, sec1, _payload_sum) = rest[:6], rest[6:11], rest[11:]
    if magic != MAGIC:
        raise CorruptChunkError(f"bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptChunkError(f"unsupported format version {version} (this reader knows {VERSION})")
    (header_sum,) = _CHECKSUM.unpack_from(view, _FIXED.size)
    if xxhash.xxh3_64_intdigest(view[: _FIXED.size]) != header_sum:
        raise CorruptChunkError("header checksum mismatch")
    has_mac = bool(flags & FLAG_MAC)
    if flags & ~FLAG_MAC or header_len != HEADER_BYTES + (MAC_BYTES if has_mac else 0):
        raise CorruptChunkError(f"bad flags {flags:#x} or header length {header_len}")
    if expected_key is not None and key != expected_key:
        raise CorruptChunkError("key mismatch: the chunk was stored under another key")
    if dtype_code not in _CODE_DTYPE or codec_code >= len(CHUNK_CODECS) or not 1 <= ndim <= MAX_DIMS:
        raise CorruptChunkError(f"bad dtype/codec/ndim codes {dtype_code}/{codec_code}/{ndim}")
    if any(dims[ndim:]) or not all(dims[:ndim]):
        raise CorruptChunkError(f"bad shape {dims} for ndim {ndim}")
    header = Header(bytes(key), _CODE_DTYPE[dtype_code], tuple(dims[:ndim]), CHUNK_CODECS[codec_code], position,
                    tuple(params), (sec0, sec1), has_mac)
    return header


def unpack(buf, expected_key: bytes | None = None, *, secret: bytes | None = None) -> tuple[Header, memoryview]:
    """Verify `buf` completely; return its header and a view of its payload. Raises CorruptChunkError."""
    view = memoryview(buf)
    header = unpack_header(view, expected_key)
    if len(view) != header.header_len + header.payload_len:
        raise CorruptChunkError(f"length mismatch: header says {header.header_len + header.payload_len} "
                                f"bytes, got {len(view)}")
    payload = view[header.header_len:]
    (payload_sum,) = struct.unpack_from("<Q", view, 112)
    if xxhash.xxh3_64_intdigest(payload) != payload_sum:
        raise CorruptChunkError("payload checksum mismatch")
    if secret is not None:
        if not header.has_mac:
            raise CorruptChunkError("unsigned chunk while cache_secret is set")
        expected = _mac(secret, view[:HEADER_BYTES], payload)
        if not hmac.compare_digest(expected, bytes(view[HEADER_BYTES:HEADER_BYTES + MAC_BYTES])):
            raise CorruptChunkError("MAC mismatch: not written by a holder of cache_secret")
    return header, payload
