"""Chunk tensor <-> stored bytes for the byte tiers (L3 disk, L4 Redis), through `serde`'s header.

Codecs: `none` (raw bytes), `zstd` (lossless: `kernels.compress_kv_lossless`, byte planes then zstd;
~1.46x on real bf16 KV vs 1.27x for zstd on raw bytes; a chunk that shrinks less than `min_ratio` is stored
raw instead, its header saying `none`), and the lossy `int8`, `fp8`, `int4`
(`kernels.quantize_kv`: data and scales as the payload's two sections, grouping in the codec parameters).

`decode(..., out=t)` writes the chunk straight into `t` (a cache entry being filled, or the caller's buffer):
for `none` and `zstd` on the CPU the stored bytes (zstd's output, read in place) are copied once, into `t`.
"""

import math

import numpy as np
import torch

from kernels.quant import TOKEN_TILE, QuantizedKV, QuantMeta, empty_quantized

# The byte tiers' data is on the CPU by the time it is serialized, so the torch references are the path
# (they are the CPU production path of every kernel; under TRITON_INTERPRET they also keep tests fast).
from kernels.quant import dequantize_kv_ref as dequantize_kv
from kernels.quant import quantize_kv_ref as quantize_kv
from kernels.shuffle import compress_kv_lossless_ref as compress_kv_lossless
from kernels.shuffle import decompress_kv_lossless

from . import serde
from .errors import CorruptChunkError

_K_GROUPING = ("channel", "token")
# Decompressed size is bounded by the header's shape: a forged frame cannot make us allocate more.
_MAX_CHUNK_BYTES = 1 << 32


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def encode(key: bytes, kv: torch.Tensor, codec: str, *, position: int = -1, level: int = 3,
           min_ratio: float = 1.0, secret: bytes | None = None) -> bytes:
    """Serialize one chunk's staging tensor (any device; moved to CPU) into stored bytes.

    min_ratio: zstd output is kept only when the chunk shrinks at least this much (raw bytes / compressed
    bytes); otherwise the chunk is stored raw (codec `none` in its header), which decodes with one copy."""
    kv = kv.detach().cpu().contiguous()
    if codec == "zstd":
        compressed = compress_kv_lossless(kv, level=level, threads=0)  # single-threaded: zstandard's default
        if len(compressed) * min_ratio <= kv.nbytes:
            return serde.pack(key, kv.dtype, kv.shape, codec, (compressed,), position=position, secret=secret)
        codec = "none"
    if codec == "none":
        return serde.pack(key, kv.dtype, kv.shape, codec, (_raw(kv),), position=position, secret=secret)
    q = quantize_kv(kv, codec=codec)
    m = q.meta
    params = (_K_GROUPING.index(m.k_grouping), m.token_tile, m.group_size, 0)
    return serde.pack(key, kv.dtype, kv.shape, codec, (_raw(q.data), _raw(q.scales)), position=position,
                      params=params, secret=secret)


def _tensor(buf, dtype: torch.dtype, shape) -> torch.Tensor:
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(buf) != expected:
        raise CorruptChunkError(f"section holds {len(buf)} bytes, shape {tuple(shape)} of {dtype} needs {expected}")
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).view(tuple(shape))


def decode(buf, key: bytes, *, secret: bytes | None = None,
           expect: tuple[tuple[int, ...], torch.dtype] | None = None,
           out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Verify and decode stored bytes into (staging tensor, position). Raises CorruptChunkError.

    expect: the (shape, dtype) the reader needs. A header that says otherwise is rejected before anything is
    decoded or allocated: its checksums prove only that someone wrote it, and a forged shape would otherwise
    size the output (or be broadcast into the reader's buffer).
    out: a tensor of the chunk's shape and dtype (any device) to decode into; the tensor returned is then
    `out`, else a new CPU tensor. `out` is written only once every check has passed."""
    header, payload = serde.unpack(buf, key, secret=secret)
    dtype, shape = header.dtype, header.shape
    if expect is not None and (shape, dtype) != (tuple(expect[0]), expect[1]):
        raise CorruptChunkError(f"chunk says {dtype} {shape}, the reader expects {expect[1]} {tuple(expect[0])}")
    if out is not None and (shape, dtype) != (tuple(out.shape), out.dtype):
        raise CorruptChunkError(f"chunk says {dtype} {shape}, the output buffer is {out.dtype} {tuple(out.shape)}")
    direct = out is not None and out.device.type == "cpu" and out.is_contiguous()  # decoded straight into out
    if header.codec == "none":
        if not direct:
            return _into(out, _tensor(payload, dtype, shape)), header.position
        dst = out.reshape(-1).view(torch.uint8).numpy()
        if len(payload) != dst.size:
            raise CorruptChunkError(f"section holds {len(payload)} bytes, shape {tuple(shape)} of {dtype} needs "
                                    f"{dst.size}")
        np.copyto(dst, np.frombuffer(payload, dtype=np.uint8))
        return out, header.position
    esize, numel = torch.empty((), dtype=dtype).element_size(), math.prod(shape)  # exact (np.prod wraps)
    if header.codec == "zstd":
        if esize * numel > _MAX_CHUNK_BYTES:  # a frame of unknown size would have this much allocated
            raise CorruptChunkError(f"shape {shape} is implausibly large for one chunk")
        try:  # refuses a frame that declares or holds another size; unshuffles zstd's output in place
            kv = decompress_kv_lossless(payload, dtype, shape, out=out if direct else None)
        except ValueError as e:
            raise CorruptChunkError(f"zstd: {e}") from e
        return _into(out, kv), header.position
    grouping, token_tile, group_size, _ = header.params
    if grouping >= len(_K_GROUPING) or not token_tile or not group_size:
        raise CorruptChunkError(f"bad codec parameters {header.params}")
    # Checked before QuantMeta: its scale layout loops over the KV dim, so a forged KV of 2**32 - 1 would
    # allocate gigabytes before any length is compared with the payload.
    staging = (len(shape) == 5 and shape[1] in (1, 2)) or (len(shape) == 4 and shape[1] == 1)
    if not staging or esize * numel > _MAX_CHUNK_BYTES:
        raise CorruptChunkError(f"shape {shape} is not a plausible staging chunk for codec {header.codec}")
    if token_tile > max(TOKEN_TILE, shape[2]) or group_size > shape[-1]:  # both size the decoder's padding
        raise CorruptChunkError(f"codec parameters {header.params} do not fit shape {shape}")
    try:
        meta = QuantMeta(header.codec, str(dtype).removeprefix("torch."), tuple(shape), _K_GROUPING[grouping],
                         token_tile, group_size)
        shapes = empty_quantized(meta, torch.device("meta"))  # shapes and dtypes only, no memory
        data_bytes, scale_bytes = payload[: header.sections[0]], payload[header.sections[0]:]
        q = QuantizedKV(_tensor(data_bytes, shapes.data.dtype, shapes.data.shape),
                        _tensor(scale_bytes, shapes.scales.dtype, shapes.scales.shape), meta)
    except (ValueError, ZeroDivisionError) as e:
        raise CorruptChunkError(f"bad quantization metadata: {e}") from e
    return _into(out, dequantize_kv(q)), header.position


def _into(out: torch.Tensor | None, kv: torch.Tensor) -> torch.Tensor:
    """kv, copied into `out` when there is one (and kv is not already it)."""
    if out is None or kv is out:
        return kv
    return out.copy_(kv)
