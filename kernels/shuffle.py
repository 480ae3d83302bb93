"""Lossless KV codec: split values into byte planes on the device, then zstd on the CPU.

Dims: the staging tensor `[L, KV, N, H, D]` (any shape works), E bytes per element, M = its numel.
`shuffle_bytes(x)` -> uint8 planes `[E, M]`, most significant byte first: a bf16/fp16 tensor gives
[hi plane, lo plane], fp32 four planes, a 1-byte dtype one plane (a copy). The hi plane of bf16 holds the
sign, the exponent and one mantissa bit: it repeats a lot, which zstd then finds (the lo plane is nearly
random). Every bit pattern (NaN payloads, inf, -0.0, subnormals) round-trips exactly. The kernel takes
bytes apart by shifts; the reference copies them in memory order (little-endian hosts, as torch's are):
on the CPU through numpy's strided copies (~10x torch's strided `copy_` there: ~4 ms for a 12 MB fp32
chunk on one core, vs ~40 ms), elsewhere with torch. Both references write into `out=` when given, so a
decoder can unshuffle straight into the cache entry it fills.

`compress_kv_lossless` / `decompress_kv_lossless` add zstd on the CPU (the cache's `zstd` chunk codec is
these two). `zstandard` is imported inside them: `kernels/` imports with torch, triton and numpy only (the
GPU machine has no zstandard).
"""

import sys

import numpy as np
import torch
import triton
import triton.language as tl

from ._env import interpret_enabled, use_triton
from .bits import INT_OF_SIZE, as_int_bits

# GPU: 4K elements per program (8 KB of bf16 in, as many bytes out); not yet swept on a GPU.
_GPU_BLOCK = 4096
# Interpreter: ~0.7 ms of Python per program whatever its size, so few large ones.
_INTERP_BLOCK = 1 << 16


@triton.jit
def _shuffle_bytes_kernel(values_ptr, planes_ptr, numel, NUM_BYTES: tl.constexpr, BLOCK: tl.constexpr,
                          TO_PLANES: tl.constexpr):
    """Element i's byte b (0 = most significant) <-> planes[b, i]; values as same-size ints."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if TO_PLANES:
        v = tl.load(values_ptr + offs, mask=mask, other=0).to(tl.int32)  # sign extension is masked off below
        for b in tl.static_range(NUM_BYTES):
            byte = (v >> (8 * (NUM_BYTES - 1 - b))) & 0xFF
            tl.store(planes_ptr + b * numel + offs, byte.to(tl.uint8), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for b in tl.static_range(NUM_BYTES):
            byte = tl.load(planes_ptr + b * numel + offs, mask=mask, other=0).to(tl.int32)
            acc = acc | (byte << (8 * (NUM_BYTES - 1 - b)))
        tl.store(values_ptr + offs, acc.to(values_ptr.dtype.element_ty), mask=mask)  # keeps the low bytes


def _check_dtype(dtype: torch.dtype, name: str) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    if size not in INT_OF_SIZE:
        raise TypeError(f"{name}: expected a 1-, 2- or 4-byte dtype (bf16, fp16, fp32, fp8, ...), got {dtype}")
    return size


def _byte_columns(x: torch.Tensor) -> torch.Tensor:
    """x's bytes as uint8 [numel, E] (column j: byte j of each element, least significant first); a view
    when x is contiguous."""
    assert sys.byteorder == "little", "the byte-plane references read bytes in little-endian memory order"
    return x.contiguous().reshape(-1).view(torch.uint8).view(-1, x.element_size())


def shuffle_bytes_ref(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`shuffle_bytes` on the pure-torch path: one strided copy of the bytes (a little-endian host's byte j
    of an element is its j-th least significant). out: a contiguous uint8 [E, numel] to write the planes into."""
    size = _check_dtype(x.dtype, "x")
    columns = _byte_columns(x.detach())
    planes = _output(out, (size, columns.shape[0]), torch.uint8, x.device, "out")
    if x.device.type == "cpu":
        np.copyto(planes.numpy(), columns.numpy()[:, ::-1].T)
    else:
        _columns_to_planes_torch(columns, planes)
    return planes


def _columns_to_planes_torch(columns: torch.Tensor, planes: torch.Tensor) -> None:
    """planes[b, i] = columns[i, E - 1 - b], in torch (devices numpy cannot reach)."""
    planes.copy_(columns.flip(1).t())


def _planes_to_columns_torch(planes: torch.Tensor, columns: torch.Tensor) -> None:
    """columns[i, j] = planes[E - 1 - j, i], in torch."""
    columns.copy_(planes.flip(0).t())


def unshuffle_bytes_ref(planes, dtype: torch.dtype, shape, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`unshuffle_bytes` on the pure-torch path. planes: the uint8 tensor, or on the CPU any bytes-like
    object holding its E * numel bytes (zstd's output: read in place, never copied). out: a contiguous
    tensor of `dtype` and `shape` on planes' device to write the values into (returned)."""
    if not isinstance(planes, torch.Tensor):
        return _unshuffle_buffer(planes, dtype, shape, out)
    _check_planes(planes, dtype, shape)
    values = _output(out, tuple(shape), dtype, planes.device, "out")
    columns = _byte_columns(values)  # a view of values' bytes
    if planes.device.type == "cpu":
        np.stack(planes.numpy()[::-1], axis=1, out=columns.numpy())
    else:
        _planes_to_columns_torch(planes, columns)
    return values


def _unshuffle_buffer(buf, dtype: torch.dtype, shape, out: torch.Tensor | None) -> torch.Tensor:
    size = _check_dtype(dtype, "dtype")
    numel = torch.Size(shape).numel()
    try:
        flat = np.frombuffer(buf, dtype=np.uint8)
    except (TypeError, ValueError) as e:
        raise TypeError(f"planes: expected a uint8 tensor or a bytes-like object, got {type(buf).__name__}") from e
    if flat.size != size * numel:
        raise ValueError(f"planes: expected {size * numel} bytes for {dtype} {tuple(shape)}, got {flat.size}")
    values = _output(out, tuple(shape), dtype, torch.device("cpu"), "out")
    np.stack(flat.reshape(size, numel)[::-1], axis=1, out=_byte_columns(values).numpy())
    return values


def _output(out: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """`out` checked against what the caller writes (a new tensor when None)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(out).__name__}")
    if (out.dtype, tuple(out.shape), out.device) != (dtype, tuple(shape), device) or not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"{'a contiguous' if out.is_contiguous() else 'a non-contiguous'} {out.dtype} tensor of "
                         f"shape {tuple(out.shape)} on {out.device}")
    return out


def _check_planes(planes: torch.Tensor, dtype: torch.dtype, shape) -> int:
    size = _check_dtype(dtype, "dtype")
    if not isinstance(planes, torch.Tensor) or planes.dtype != torch.uint8:
        raise TypeError(f"planes: expected a uint8 tensor from shuffle_bytes, got "
                        f"{getattr(planes, 'dtype', type(planes).__name__)}")
    numel = torch.Size(shape).numel()
    if tuple(planes.shape) != (size, numel):
        raise ValueError(f"planes: expected shape ({size}, {numel}) for {dtype} {tuple(shape)}, "
                         f"got {tuple(planes.shape)}")
    return size


def _launch(values: torch.Tensor, planes: torch.Tensor, to_planes: bool) -> None:
    numel = values.numel()
    block = _INTERP_BLOCK if interpret_enabled() and not values.is_cuda else _GPU_BLOCK
    _shuffle_bytes_kernel[(triton.cdiv(numel, block),)](values, planes, numel, NUM_BYTES=planes.shape[0],
                                                        BLOCK=block, TO_PLANES=to_planes)


def shuffle_bytes(x: torch.Tensor) -> torch.Tensor:
    """Byte planes of `x`: uint8 `[E, numel]`, plane 0 the most significant byte of every element."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    size = _check_dtype(x.dtype, "x")
    if x.numel() == 0 or not use_triton(x):
        return shuffle_bytes_ref(x)
    values = as_int_bits(x.contiguous()).reshape(-1)
    planes = torch.empty((size, x.numel()), dtype=torch.uint8, device=x.device)
    _launch(values, planes, to_planes=True)
    return planes


def unshuffle_bytes(planes: torch.Tensor, dtype: torch.dtype, shape, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor of `dtype` and `shape` whose `shuffle_bytes` is `planes` (bit-exact); written into `out`
    (contiguous, that dtype and shape, on planes' device) when given."""
    _check_planes(planes, dtype, shape)
    if planes.numel() == 0 or not use_triton(planes):
        return unshuffle_bytes_ref(planes, dtype, shape, out=out)
    values = _output(out, tuple(shape), dtype, planes.device, "out")
    _launch(as_int_bits(values.view(-1)), planes.contiguous(), to_planes=False)
    return values


def _zstd_frame(planes: torch.Tensor, level: int, threads: int) -> bytes:
    import zstandard  # lazy: kernels/ must import without it (the GPU machine has none)

    return zstandard.ZstdCompressor(level=level, threads=threads).compress(planes.cpu().numpy())


def compress_kv_lossless(x: torch.Tensor, *, level: int = 1, threads: int = -1) -> bytes:
    """shuffle_bytes on x's device, then one zstd frame of the planes on the CPU (multithreaded).

    threads: zstd worker threads; -1 = one per core (zstandard's own detection), 0 = single-threaded.
    The frame records its size, not the dtype or shape: the caller stores those (the chunk header) and
    passes them to decompress_kv_lossless.
    """
    return _zstd_frame(shuffle_bytes(x), level, threads)


def compress_kv_lossless_ref(x: torch.Tensor, *, level: int = 1, threads: int = -1) -> bytes:
    """`compress_kv_lossless` with the planes from `shuffle_bytes_ref`: the same bytes, on the pure-torch path."""
    return _zstd_frame(shuffle_bytes_ref(x), level, threads)


def decompress_kv_lossless(blob, dtype: torch.dtype, shape, device=None, *,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """The exact tensor `compress_kv_lossless` was given, unshuffled on `device` (default CPU), or into `out`
    (a contiguous tensor of `dtype` and `shape`, on its own device; returned). On the CPU, zstd's output is
    read in place. blob: bytes-like. Raises ValueError when blob is not one zstd frame of exactly those bytes;
    a frame that declares another size is refused before anything is allocated."""
    import zstandard

    size = _check_dtype(dtype, "dtype")
    numel = torch.Size(shape).numel()
    nbytes, what = size * numel, f"{size * numel} bytes for {dtype} {tuple(shape)}"
    try:
        declared = zstandard.frame_content_size(blob)  # decompress() trusts it: check before it allocates
        if declared not in (nbytes, zstandard.CONTENTSIZE_UNKNOWN):
            raise ValueError(f"blob: the zstd frame declares {declared} bytes, expected {what}")
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=nbytes)
    except zstandard.ZstdError as e:
        raise ValueError(f"blob: not a zstd frame of {what} ({e})") from e
    if len(raw) != nbytes:
        raise ValueError(f"blob: decompressed to {len(raw)} bytes, expected {what}")
    if out is not None:
        device = out.device
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return unshuffle_bytes_ref(raw, dtype, shape, out=out)  # reads zstd's output in place
    planes = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(size, numel)
    return unshuffle_bytes(planes.to(device), dtype, shape, out=out)
