"""What an attacker or a broken disk does to a stored chunk (format: lmcache_core/serde.py).

`corruptions(rng, blob, others)` yields (category, bytes) cases: bit flips, truncations, extensions, another
chunk's valid bytes (swap), and forged headers whose header checksum (and, where it helps the forger, payload
checksum) is recomputed, so only the reader's field checks stand between the bytes and the KV.
"""

import random
import struct
from collections.abc import Iterator

import xxhash

from lmcache_core import serde

# offset, struct format of each header field (serde.py's table)
FIELDS = {
    "version": (4, "<H"), "header_len": (6, "<H"), "flags": (8, "<I"), "key": (12, "32s"),
    "dtype": (44, "<B"), "ndim": (45, "<B"), "codec": (46, "<B"),
    **{f"dim{i}": (48 + 4 * i, "<I") for i in range(6)},
    "position": (72, "<q"), **{f"param{i}": (80 + 4 * i, "<I") for i in range(4)},
    "section0": (96, "<Q"), "section1": (104, "<Q"), "payload_sum": (112, "<Q"),
}
HUGE = 2**40  # a forged length: a reader that trusted it would ask for a terabyte


def read(blob: bytes, field: str):
    offset, fmt = FIELDS[field]
    return struct.unpack_from(fmt, blob, offset)[0]


def fix_header_sum(buf: bytearray) -> None:
    struct.pack_into("<Q", buf, serde._FIXED.size, xxhash.xxh3_64_intdigest(bytes(buf[: serde._FIXED.size])))


def fix_payload_sum(buf: bytearray) -> None:
    header_len = serde.HEADER_BYTES + (serde.MAC_BYTES if read(buf, "flags") & serde.FLAG_MAC else 0)
    struct.pack_into("<Q", buf, 112, xxhash.xxh3_64_intdigest(bytes(buf[header_len:])))


def reforge(blob: bytes, *, payload: bytes | None = None, **fields) -> bytes:
    """Set header fields (and optionally replace the payload, fixing section 0 and the payload checksum),
    then recompute the header checksum, as a deliberate forger would."""
    buf = bytearray(blob)
    header_len = serde.HEADER_BYTES + (serde.MAC_BYTES if read(blob, "flags") & serde.FLAG_MAC else 0)
    if payload is not None:
        buf = buf[:header_len] + bytearray(payload)
        struct.pack_into("<QQ", buf, 96, len(payload), 0)
        fix_payload_sum(buf)
    for name, value in fields.items():
        offset, fmt = FIELDS[name]
        struct.pack_into(fmt, buf, offset, value)
    fix_header_sum(buf)
    return bytes(buf)


def _shape(blob: bytes) -> list[int]:
    return [read(blob, f"dim{i}") for i in range(read(blob, "ndim"))]


def _set_shape(shape: list[int]) -> dict:
    dims = list(shape) + [0] * (6 - len(shape))
    return {"ndim": len(shape), **{f"dim{i}": d for i, d in enumerate(dims)}}


def forged_headers(rng: random.Random, blob: bytes, other: bytes, *,
                   well_formed: bool = False) -> Iterator[tuple[str, bytes]]:
    """Header forgeries of `blob` with valid header checksums (one or a few of each kind per call).

    well_formed=False leaves out relabellings that give a well-formed chunk of the right key, shape and
    dtype (int8 data relabelled fp8 and back: same section sizes; K scales relabelled per channel <-> per
    token where the counts agree): such a chunk is what an honest writer could have stored, so without a
    MAC (cache_secret) nothing can tell it from one; the signed-chunk tests pass True."""
    shape = _shape(blob)
    dtype, codec = read(blob, "dtype"), read(blob, "codec")
    body = blob[serde.HEADER_BYTES:]
    yield "forged-version", reforge(blob, version=rng.choice([0, 2, 0xFFFF]))
    yield "forged-header-len", reforge(blob, header_len=rng.choice([0, 127, 129, 160, 0xFFFF]))
    yield "forged-flags", reforge(blob, flags=rng.choice([1, 2, 0x80000000, 0xFFFFFFFF]))
    yield "forged-key", reforge(blob, key=rng.choice([rng.randbytes(32), other[12:44]]))
    yield "forged-dtype", reforge(blob, dtype=rng.choice([c for c in range(9) if c != dtype] + [255]))
    yield "forged-ndim", reforge(blob, ndim=rng.choice([n for n in range(8) if n != len(shape)]))
    relabel = {2: 3, 3: 2}  # int8 <-> fp8: the same section sizes
    codecs = [c for c in range(6) if c != codec and (well_formed or relabel.get(codec) != c)]
    yield "forged-codec", reforge(blob, codec=rng.choice(codecs + [255]))
    i = rng.randrange(len(shape))
    dims = list(shape)
    dims[i] = rng.choice([0, 1, shape[i] + 1, shape[i] - 1 or 3, 2**31, 2**32 - 1])
    yield "forged-dim", reforge(blob, **_set_shape(dims))
    permuted = shape[::-1] if shape != shape[::-1] else [*shape, 1]
    yield "forged-shape-permuted", reforge(blob, **_set_shape(permuted))
    # same element count, other shape: the payload still fits, so only the reader's expectation catches it
    if shape[0] % 2 == 0:
        yield "forged-shape-same-size", reforge(blob, **_set_shape([shape[0] // 2, shape[1] * 2, *shape[2:]]))
    # a consistent smaller chunk: half the layers, payload cut to match, every checksum right (codec none)
    if codec == 0 and shape[0] % 2 == 0:
        half = body[: len(body) // 2]
        yield "forged-consistent-half", reforge(blob, payload=half, **_set_shape([shape[0] // 2, *shape[1:]]))
    # the same bytes declared as another dtype of the same width (bf16 <-> fp16), every checksum right
    if dtype in (2, 3):
        yield "forged-dtype-same-width", reforge(blob, dtype=5 - dtype)
    yield "forged-section0", reforge(blob, section0=rng.choice([HUGE, 2**64 - 1, 0, read(blob, "section0") + 1]))
    yield "forged-section1", reforge(blob, section1=rng.choice([HUGE, 2**64 - 1, 1]))
    yield "forged-sections-swapped", reforge(blob, section0=read(blob, "section1") or HUGE,
                                             section1=read(blob, "section0"))
    yield "forged-payload-sum", reforge(blob, payload_sum=rng.randrange(2**64))
    if codec >= 2:  # quantized: grouping, token tile (used by per-channel K scales only), group size
        used = [1, 2] if read(blob, "param0") == 0 else [2]
        p = rng.choice(used + [0] if well_formed else used)
        yield "forged-codec-params", reforge(blob, **{f"param{p}": rng.choice([0, 1, 3, 2**31, 2**32 - 1])})


def corruptions(rng: random.Random, blob: bytes, others: list[bytes], *,
                well_formed: bool = False) -> Iterator[tuple[str, bytes]]:
    """One round of every kind of damage to `blob`; `others` are other chunks' valid bytes (see
    `forged_headers` for well_formed)."""
    for _ in range(12):
        bad = bytearray(blob)
        for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
            bit = rng.randrange(len(blob) * 8)
            bad[bit // 8] ^= 1 << (bit % 8)
        yield "bitflip", bytes(bad)
    cuts = [0, 1, 4, serde.HEADER_BYTES - 1, serde.HEADER_BYTES, serde.HEADER_BYTES + 1, len(blob) - 1]
    for cut in rng.sample(cuts, 3) + [rng.randrange(len(blob))]:
        yield "truncate", blob[:cut]
    yield "extend", blob + rng.randbytes(rng.randint(1, 64))
    yield "swap", rng.choice(others)
    yield "garbage", rng.randbytes(len(blob))
    yield from forged_headers(rng, blob, rng.choice(others), well_formed=well_formed)


def zstd_bomb_frame(size: int) -> bytes:
    """A valid zstd frame that declares and expands to `size` zero bytes from ~size/32768 bytes: single
    segment, 8-byte content size, then RLE blocks of 128 KiB (3-byte block header + 1 byte each)."""
    block = 128 * 1024
    assert size % block == 0, size
    out = bytearray(struct.pack("<IB", 0xFD2FB528, 0b1110_0000) + struct.pack("<Q", size))
    n = size // block
    for i in range(n):
        header = (block << 3) | (1 << 1) | (1 if i == n - 1 else 0)  # size, type RLE, last block
        out += header.to_bytes(3, "little") + b"\0"
    return bytes(out)
