"""Gather KV of arbitrary token slots from paged caches into one contiguous staging tensor, and back.

Dims: L layers, N tokens, NB paged blocks, BS block size, H kv heads, D head dim, KV = 2 (K, V) or 1 (MLA).
Staging is `[L, KV, N, H, D]` (`[L, 1, N, D]` for MLA) in the cache dtype. `slot_mapping[n]` is the slot
(`block_id * BS + offset`) of token n; -1 is vLLM's padding: gather writes zeros, scatter skips it.
Bytes move as same-size integers, so every dtype (float8 included) is copied exactly, NaN payloads too.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import math

import torch
import triton
import triton.language as tl

from ._env import interpret_enabled, use_triton
from .layout import KVLayout

# GPU tiles: 8K elements (16 KB of bf16) per program, 4 warps; a starting point, not yet swept on a GPU.
_GPU_TILE_ELEMS = 8192
_GPU_MAX_BLOCK_C = 1024
# Interpreter: a program costs ~0.7 ms of Python whatever its size, so few large ones: 64 tokens x <=4K columns.
_INTERP_BLOCK_N = 64
_INTERP_MAX_BLOCK_C = 4096

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
                    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@triton.jit
def _paged_kv_copy_kernel(
    cache_ptr, layer_offsets_ptr, staging_ptr, slot_ptr,
    num_tokens, block_size,
    stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_CONTIGUOUS: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TO_STAGING: tl.constexpr,
):
    """One program moves a [BLOCK_N tokens, BLOCK_C of the H*D row] tile of one layer's K or V."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_lkv = tl.program_id(2).to(tl.int64)  # layer * NUM_KV + kv: the staging row block
    layer = pid_lkv // NUM_KV
    kv = pid_lkv % NUM_KV

    tok = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_in = tok < num_tokens
    slot = tl.load(slot_ptr + tok, mask=tok_in, other=-1).to(tl.int64)
    valid = slot >= 0
    block = slot // block_size
    row_start = (tl.load(layer_offsets_ptr + layer) + kv * stride_kv
                 + block * stride_block + (slot - block * block_size) * stride_slot)
    row_start = tl.multiple_of(row_start, ALIGN)

    col = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_in = col < ROW
    if ROW_CONTIGUOUS:  # H and D adjacent and dense: the row is one contiguous run
        col_off = col
    else:
        head = col // HEAD_DIM
        col_off = head * stride_head + (col - head * HEAD_DIM) * stride_dim

    cache_ptrs = cache_ptr + row_start[:, None] + col_off[None, :]
    staging_ptrs = staging_ptr + (pid_lkv * num_tokens + tok)[:, None] * ROW + col[None, :]
    if TO_STAGING:
        x = tl.load(cache_ptrs, mask=valid[:, None] & col_in[None, :], other=0)
        tl.store(staging_ptrs, x, mask=tok_in[:, None] & col_in[None, :])
    else:
        mask = valid[:, None] & col_in[None, :]
        tl.store(cache_ptrs, tl.load(staging_ptrs, mask=mask), mask=mask)


@dataclass(frozen=True)
class PagedKV:
    """Where every element of a paged KV cache lives, for any layout: the byte-mover's view of it.

    Element (layer l, kv, block, offset, head h, dim d) sits at `base[layer_offsets[l] + kv*stride_kv +
    block*stride_block + offset*stride_slot + h*stride_head + d*stride_dim]`, counted in elements.
    """

    layers: tuple[torch.Tensor, ...]  # canonical views [KV, NB, BS, H, D] as same-size ints
    base: torch.Tensor  # layers[0]
    layer_offsets: torch.Tensor  # int64 [L] on the cache device
    layer_offsets_gcd: int  # every layer offset is a multiple of it (0 for one layer)
    dtype: torch.dtype
    num_kv: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    has_heads: bool
    stride_kv: int
    stride_block: int
    stride_slot: int
    stride_head: int
    stride_dim: int

    @property
    def num_layers(self) -> int:
        return self.layer_offsets.numel()

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def staging_shape(self, num_tokens: int) -> tuple[int, ...]:
        tail = (self.num_heads, self.head_dim) if self.has_heads else (self.head_dim,)
        return (self.num_layers, self.num_kv, num_tokens, *tail)


@lru_cache(maxsize=64)
def _layer_offsets(ptrs: tuple[int, ...], element_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Element offsets of each layer from layer 0 (on `device`) and their gcd; cached: caches never move."""
    for i, p in enumerate(ptrs):
        assert (p - ptrs[0]) % element_size == 0, f"layer {i} is not element-aligned with layer 0"
    offsets = [(p - ptrs[0]) // element_size for p in ptrs]
    return torch.tensor(offsets, dtype=torch.int64, device=device), math.gcd(*offsets)


def resolve_paged(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: KVLayout) -> PagedKV:
    """Validate `kv_caches` against `layout` and describe where its elements live."""
    if not isinstance(layout, KVLayout):
        raise TypeError(f"layout: expected a KVLayout (KVLayout.from_name / parse), got {type(layout).__name__}")
    if layout.has_layers:
        if not isinstance(kv_caches, torch.Tensor):
            raise TypeError(f"kv_caches: layout {layout} has an L dim, so expected one tensor, "
                            f"got {type(kv_caches).__name__}")
        whole = layout.canonical(kv_caches)  # [L, KV, NB, BS, H, D]
        layers = tuple(whole.unbind(0))
    else:
        if isinstance(kv_caches, torch.Tensor) or not isinstance(kv_caches, Sequence) or not kv_caches:
            raise TypeError(f"kv_caches: layout {layout} has no L dim, so expected a non-empty sequence of "
                            f"per-layer tensors, got {type(kv_caches).__name__} (wrap a single layer in a list)")
        layers = tuple(layout.canonical(t) for t in kv_caches)
    first = layers[0]
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kv_caches: dtype {first.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    for i, t in enumerate(layers[1:], start=1):
        for what, got, want in (("shape", t.shape, first.shape), ("dtype", t.dtype, first.dtype),
                                ("device", t.device, first.device), ("strides", t.stride(), first.stride())):
            if got != want:
                raise ValueError(f"kv_caches[{i}]: {what} {tuple(got) if what != 'dtype' else got} differs "
                                 f"from layer 0's {tuple(want) if what != 'dtype' else want}")
    ints = tuple(t.view(_INT_OF_SIZE[t.element_size()]) for t in layers)
    num_kv, num_blocks, block_size, num_heads, head_dim = first.shape
    s_kv, s_block, s_slot, s_head, s_dim = first.stride()
    offsets, offsets_gcd = _layer_offsets(tuple(t.data_ptr() for t in ints), first.element_size(), first.device)
    return PagedKV(ints, ints[0], offsets, offsets_gcd, first.dtype, num_kv, num_blocks, block_size, num_heads, head_dim,
                   layout.has_heads, s_kv, s_block, s_slot, s_head, s_dim)


def _check_slots(slot_mapping: torch.Tensor, pk: PagedKV, *, unique: bool, validate: bool) -> None:
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping: expected a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping: expected dtype int32 or int64, got {slot_mapping.dtype}")
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping: expected shape [N], got {tuple(slot_mapping.shape)}")
    if slot_mapping.device != pk.base.device:
        raise ValueError(f"slot_mapping: expected device {pk.base.device} (the caches'), got {slot_mapping.device}")
    if not validate or slot_mapping.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(slot_mapping))
    if lo < -1 or hi >= pk.num_slots:
        raise ValueError(f"slot_mapping: slots must be -1 (padding) or in [0, {pk.num_slots}) "
                         f"(NB={pk.num_blocks} x BS={pk.block_size}), got values in [{lo}, {hi}]")
    if unique:
        real = slot_mapping[slot_mapping >= 0]
        if torch.unique(real).numel() != real.numel():
            raise ValueError("slot_mapping: scatter got a slot more than once; each destination slot "
                             "may appear once (the write order of duplicates is undefined)")


def _check_staging(t: torch.Tensor, pk: PagedKV, num_tokens: int, name: str) -> None:
    expected = pk.staging_shape(num_tokens)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != expected:
        size = "too small" if t.numel() < torch.Size(expected).numel() else "wrong shape"
        raise ValueError(f"{name}: expected shape {expected} ([L, KV, N, H, D]), got {tuple(t.shape)} ({size})")
    if t.dtype != pk.dtype:
        raise TypeError(f"{name}: expected the caches' dtype {pk.dtype}, got {t.dtype}")
    if t.device != pk.base.device:
        raise ValueError(f"{name}: expected device {pk.base.device} (the caches'), got {t.device}")
    if name == "out" and not t.is_contiguous():
        raise ValueError(f"out: must be contiguous (strides {tuple(t.stride())}); pass torch.empty(...) "
                         "of the staging shape")


# ---------------------------------------------------------------------------------------------------------
# Pure-torch reference: the CPU production path and the tests' oracle. One index_select per layer over a
# view of the cache as rows of its widest contiguous run (H*D when heads are dense, else D), no token loop.
# ---------------------------------------------------------------------------------------------------------


def _row_width(pk: PagedKV) -> int:
    candidates = []
    if pk.stride_dim == 1 and (pk.num_heads == 1 or pk.stride_head == pk.head_dim):
        candidates.append(pk.num_heads * pk.head_dim)
    if pk.stride_dim == 1:
        candidates.append(pk.head_dim)
    for width in candidates:
        strides = (pk.stride_kv, pk.stride_block, pk.stride_slot) + ((pk.stride_head,) if width == pk.head_dim
                                                                    else ())
        if all(s % width == 0 for s in strides):
            return width
    return 1


def _row_index(pk: PagedKV, slots: torch.Tensor, width: int) -> torch.Tensor:
    """Row index (in a view of rows of `width` elements) of every (kv, token[, head]) run, flattened."""
    slots = slots.to(torch.int64)
    block = slots // pk.block_size
    start = block * pk.stride_block + (slots - block * pk.block_size) * pk.stride_slot  # [N]
    kv = torch.arange(pk.num_kv, device=slots.device) * pk.stride_kv
    start = kv[:, None] + start[None, :]  # [KV, N]
    if width == pk.num_heads * pk.head_dim:
        return (start // width).reshape(-1)
    heads = torch.arange(pk.num_heads, device=slots.device) * pk.stride_head
    start = start[..., None] + heads  # [KV, N, H]
    if width == 1:
        dims = torch.arange(pk.head_dim, device=slots.device) * pk.stride_dim
        start = start[..., None] + dims  # [KV, N, H, D]
    return (start // width).reshape(-1)


def _rows(layer: torch.Tensor, width: int) -> torch.Tensor:
    """`layer` (a canonical view) seen as a 2-D tensor of rows of `width` contiguous elements."""
    last = sum((size - 1) * stride for size, stride in zip(layer.shape, layer.stride()))
    return _widest(layer.as_strided((last // width + 1, width), (width, 1)))


def _widest(rows: torch.Tensor) -> torch.Tensor:
    """Rows reinterpreted as int64 when their bytes allow: torch's index kernels move 8-byte elements
    1.7x faster than 2-byte ones (bench.kernels, scatter on 2 CPU cores)."""
    row_bytes = rows.shape[1] * rows.element_size()
    if rows.element_size() < 8 and row_bytes % 8 == 0 and rows.data_ptr() % 8 == 0:
        return rows.view(torch.int64)
    return rows


def gather_kv_ref(kv_caches, slot_mapping, layout, out=None, *, validate=True):
    """`gather_kv` on the pure-torch path (the CPU production path and the tests' oracle)."""
    return _gather(kv_caches, slot_mapping, layout, out, validate, backend="torch")


def scatter_kv_ref(staging, kv_caches, slot_mapping, layout, *, validate=True):
    """`scatter_kv` on the pure-torch path."""
    _scatter(staging, kv_caches, slot_mapping, layout, validate, backend="torch")


def _gather_torch(pk: PagedKV, slots: torch.Tensor, out: torch.Tensor) -> None:
    width = _row_width(pk)
    pad = slots < 0
    index = _row_index(pk, slots.clamp(min=0), width)
    out_ints = out.view(_INT_OF_SIZE[out.element_size()])
    for layer, dst in zip(pk.layers, out_ints.view(pk.num_layers, -1, width)):
        rows = _rows(layer, width)
        torch.index_select(rows, 0, index, out=dst.view(rows.dtype))
    if pad.any():
        out_ints[:, :, pad] = 0


def _scatter_torch(pk: PagedKV, slots: torch.Tensor, staging: torch.Tensor) -> None:
    width = _row_width(pk)
    src = staging.view(_INT_OF_SIZE[staging.element_size()])
    keep = slots >= 0
    if not keep.all():
        slots, src = slots[keep], src[:, :, keep]
    index = _row_index(pk, slots, width)
    for layer, values in zip(pk.layers, src.reshape(pk.num_layers, -1, width)):
        rows = _rows(layer, width)
        rows.index_copy_(0, index, values.view(rows.dtype))


# ---------------------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------------------


def _launch(pk: PagedKV, slots: torch.Tensor, staging: torch.Tensor, to_staging: bool) -> None:
    row = pk.num_heads * pk.head_dim
    num_tokens = slots.numel()
    if interpret_enabled() and not staging.is_cuda:
        block_c = min(triton.next_power_of_2(row), _INTERP_MAX_BLOCK_C)
        block_n = _INTERP_BLOCK_N
    else:
        block_c = min(triton.next_power_of_2(row), _GPU_MAX_BLOCK_C)
        block_n = max(1, min(_GPU_TILE_ELEMS // block_c, triton.next_power_of_2(num_tokens)))
    row_contiguous = pk.stride_dim == 1 and (pk.num_heads == 1 or pk.stride_head == pk.head_dim)
    # Row starts provably 16-element aligned let Triton emit 16-byte vector loads.
    starts = (pk.stride_kv, pk.stride_block, pk.stride_slot, pk.layer_offsets_gcd)
    align = 16 if all(s % 16 == 0 for s in starts) else 1
    grid = (triton.cdiv(num_tokens, block_n), triton.cdiv(row, block_c), pk.num_layers * pk.num_kv)
    _paged_kv_copy_kernel[grid](
        pk.base, pk.layer_offsets, staging.view(pk.base.dtype), slots,
        num_tokens, pk.block_size,
        pk.stride_kv, pk.stride_block, pk.stride_slot, pk.stride_head, pk.stride_dim,
        NUM_KV=pk.num_kv, HEAD_DIM=pk.head_dim, ROW=row, ROW_CONTIGUOUS=row_contiguous, ALIGN=align,
        BLOCK_N=block_n, BLOCK_C=block_c, TO_STAGING=to_staging,
    )


# ---------------------------------------------------------------------------------------------------------
# Public launchers
# ---------------------------------------------------------------------------------------------------------


def _gather(kv_caches, slot_mapping, layout, out, validate, backend=None):
    pk = resolve_paged(kv_caches, layout)
    _check_slots(slot_mapping, pk, unique=False, validate=validate)
    num_tokens = slot_mapping.numel()
    if out is None:
        out = torch.empty(pk.staging_shape(num_tokens), dtype=pk.dtype, device=pk.base.device)
    else:
        _check_staging(out, pk, num_tokens, "out")
    if num_tokens == 0:
        return out
    if use_triton(pk.base, backend):
        _launch(pk, slot_mapping, out, to_staging=True)
    else:
        _gather_torch(pk, slot_mapping, out)
    return out


def _scatter(staging, kv_caches, slot_mapping, layout, validate, backend=None):
    pk = resolve_paged(kv_caches, layout)
    _check_slots(slot_mapping, pk, unique=True, validate=validate)
    _check_staging(staging, pk, slot_mapping.numel(), "staging")
    if slot_mapping.numel() == 0:
        return
    staging = staging.contiguous()
    if use_triton(pk.base, backend):
        _launch(pk, slot_mapping, staging, to_staging=False)
    else:
        _scatter_torch(pk, slot_mapping, staging)


def gather_kv(kv_caches, slot_mapping, layout, out=None, *, validate=True):
    """Copy the KV of `slot_mapping`'s slots, every layer in one launch, into staging `[L, KV, N, H, D]`.

    kv_caches: per-layer tensors (or one tensor with an L dim) in `layout`. slot_mapping: int32/int64 [N],
    any positions and order, repeats allowed, -1 = padding (zeros). out: an optional contiguous staging
    tensor to fill. validate=False skips the slot range check (one device sync) on hot paths.
    Returns the staging tensor.
    """
    return _gather(kv_caches, slot_mapping, layout, out, validate)


def scatter_kv(staging, kv_caches, slot_mapping, layout, *, validate=True):
    """Write staging `[L, KV, N, H, D]` into the paged caches at `slot_mapping` (in place).

    Slots equal to -1 are skipped; a slot may appear once. validate=False skips the range and
    uniqueness checks (device syncs) on hot paths.
    """
    _scatter(staging, kv_caches, slot_mapping, layout, validate)


def gather_kv_triton(kv_caches, slot_mapping, layout, out=None, *, validate=True):
    """`gather_kv` on the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    return _gather(kv_caches, slot_mapping, layout, out, validate, backend="triton")


def scatter_kv_triton(staging, kv_caches, slot_mapping, layout, *, validate=True):
    """`scatter_kv` on the Triton kernel."""
    _scatter(staging, kv_caches, slot_mapping, layout, validate, backend="triton")
