"""Lossless KV codec: split values into byte planes on the device, then zstd on the CPU.

Dims: the staging tensor `[L, KV, N, H, D]` (any shape works), E bytes per element, M = its numel.
`shuffle_bytes(x)` -> uint8 planes `[E, M]`, most significant byte first: a bf16/fp16 tensor gives
[hi plane, lo plane], fp32 four planes, a 1-byte dtype one plane (a copy). The hi plane of bf16 holds the
sign, the exponent and one mantissa bit: it repeats a lot, which zstd then finds (the lo plane is nearly
random). Every bit pattern (NaN payloads, inf, -0.0, subnormals) round-trips exactly. The kernel takes
bytes apart by shifts; the reference copies them in memory order (little-endian hosts, as torch's are).

`compress_kv_lossless` / `decompress_kv_lossless` add zstd on the CPU. `zstandard` is imported inside
them: `kernels/` imports with torch, triton and numpy only (the GPU machine has no zstandard).
"""

import sys

import torch
import triton
import triton.language as tl

from ._env import interpret_enabled, use_triton

# GPU: 4K elements per program (8 KB of bf16 in, as many bytes out); not yet swept on a GPU.
_GPU_BLOCK = 4096
# Interpreter: ~0.7 ms of Python per program whatever its size, so few large ones.
_INTERP_BLOCK = 1 << 16
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


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
    if size not in _INT_OF_SIZE:
        raise TypeError(f"{name}: expected a 1-, 2- or 4-byte dtype (bf16, fp16, fp32, fp8, ...), got {dtype}")
    return size


def shuffle_bytes_ref(x: torch.Tensor) -> torch.Tensor:
    """`shuffle_bytes` on the pure-torch path: one strided copy of the bytes (a little-endian host's byte j
    of an element is its j-th least significant)."""
    size = _check_dtype(x.dtype, "x")
    assert sys.byteorder == "little", "shuffle_bytes_ref reads bytes in little-endian memory order"
    return x.contiguous().view(torch.uint8).view(-1, size).flip(1).t().contiguous()


def unshuffle_bytes_ref(planes: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """`unshuffle_bytes` on the pure-torch path."""
    _check_planes(planes, dtype, shape)
    assert sys.byteorder == "little", "unshuffle_bytes_ref writes bytes in little-endian memory order"
    return planes.flip(0).t().contiguous().view(-1).view(dtype).reshape(shape)


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
    values = x.contiguous().view(_INT_OF_SIZE[size]).reshape(-1)
    planes = torch.empty((size, x.numel()), dtype=torch.uint8, device=x.device)
    _launch(values, planes, to_planes=True)
    return planes


def unshuffle_bytes(planes: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor of `dtype` and `shape` whose `shuffle_bytes` is `planes` (bit-exact)."""
    size = _check_planes(planes, dtype, shape)
    if planes.numel() == 0 or not use_triton(planes):
        return unshuffle_bytes_ref(planes, dtype, shape)
    values = torch.empty(torch.Size(shape).numel(), dtype=_INT_OF_SIZE[size], device=planes.device)
    _launch(values, planes.contiguous(), to_planes=False)
    return values.view(dtype).reshape(shape)


def compress_kv_lossless(x: torch.Tensor, *, level: int = 1, threads: int = -1) -> bytes:
    """shuffle_bytes on x's device, then one zstd frame of the planes on the CPU (multithreaded).

    threads: zstd worker threads; -1 = one per core (zstandard's own detection), 0 = single-threaded.
    The frame records its size, not the dtype or shape: the caller stores those (the chunk header) and
    passes them to decompress_kv_lossless.
    """
    import zstandard  # lazy: kernels/ must import without it (the GPU machine has none)

    planes = shuffle_bytes(x).cpu()
    return zstandard.ZstdCompressor(level=level, threads=threads).compress(planes.numpy())


def decompress_kv_lossless(blob: bytes, dtype: torch.dtype, shape, device=None) -> torch.Tensor:
    """The exact tensor `compress_kv_lossless` was given (unshuffled on `device`, default CPU)."""
    import zstandard

    size = _check_dtype(dtype, "dtype")
    numel = torch.Size(shape).numel()
    declared = zstandard.frame_content_size(blob)  # decompress() trusts it: check before it allocates
    if declared not in (size * numel, zstandard.CONTENTSIZE_UNKNOWN):
        raise ValueError(f"blob: the zstd frame declares {declared} bytes, expected {size * numel} for {dtype} "
                         f"{tuple(shape)}")
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size * numel)
    if len(raw) != size * numel:
        raise ValueError(f"blob: decompressed to {len(raw)} bytes, expected {size * numel} for {dtype} "
                         f"{tuple(shape)}")
    planes = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    planes = planes.view(size, numel)
    return unshuffle_bytes(planes.to(device) if device is not None else planes, dtype, shape)
