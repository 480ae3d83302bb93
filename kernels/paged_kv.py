"""Paged transfer: gather the KV of arbitrary token slots from paged caches into one contiguous staging
tensor, and scatter it back.

Dims: L layers, N tokens, NB paged blocks, BS block size, H kv heads, D head dim, KV = 2 (K, V) or 1 (MLA).
Staging is `[L, KV, N, H, D]` (`[L, 1, N, D]` for MLA) in the cache dtype. `slot_mapping[n]` is the slot
(`block_id * BS + offset`) of token n; -1 is vLLM's padding: gather writes zeros, scatter skips it.
Bytes move as same-size integers, so every dtype (float8 included) is copied exactly, NaN payloads too.
Where each element lives (`PagedKV`, `resolve_paged`, the slot checks): kernels/paged_addressing.py.
"""

import torch
import triton
import triton.language as tl

from ._env import interpret_enabled, use_triton
from .bits import as_int_bits
from .paged_addressing import PagedKV, check_slots, check_staging, resolve_paged

# GPU tiles: 8K elements (16 KB of bf16) per program, 4 warps; a starting point, not yet swept on a GPU.
_GPU_TILE_ELEMS = 8192
_GPU_MAX_BLOCK_C = 1024
# Interpreter: a program costs ~0.7 ms of Python whatever its size, so few large ones: 64 tokens x <=4K columns.
_INTERP_BLOCK_N = 64
_INTERP_MAX_BLOCK_C = 4096


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


# ---------------------------------------------------------------------------------------------------------
# Pure-torch reference: the CPU production path and the tests' oracle. No token loop. Three strategies, the
# first that applies (bench.kernels measures each against a plain copy):
# - block runs: the slots are whole blocks, each in order (how an engine's slots for a request look), in
#   few runs of consecutive blocks: one (strided) copy per run and layer, which also transposes
#   [H, BS, D] to [BS, H, D] for HND layouts and vLLM's CPU layout;
# - block rows: whole blocks in many runs, and a block's tokens are one contiguous slab of the cache (NHD
#   layouts): one index_select / row scatter per layer over rows of BS*H*D elements;
# - token rows: any slots: one index_select/index_copy_ per layer over rows of the cache's widest contiguous
#   run (H*D when heads are dense, else D).
# ---------------------------------------------------------------------------------------------------------

# A strided copy costs a few microseconds of dispatch; runs moving less than this per layer go by token rows.
_MIN_RUN_BYTES = 128 * 1024


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


def _row_views(pk: PagedKV, width: int) -> list[torch.Tensor]:
    """Every layer (a canonical view) seen as a 2-D tensor of rows of `width` contiguous elements, each row
    reinterpreted as the widest elements its bytes allow (16-byte complex128, else int64). torch's index
    kernels move one element per step, so wider elements move rows faster (bench.kernels, scatter on 2 CPU
    cores: 16-byte elements 1.1-1.3x 8-byte ones, which are 1.7x 2-byte ones). Elements are only copied,
    never computed on, so every bit pattern moves unchanged (tested with NaN payloads)."""
    first = pk.layers[0]
    last = sum((size - 1) * stride for size, stride in zip(first.shape, first.stride()))
    shape = (last // width + 1, width)
    row_bytes = width * first.element_size()
    wide = next((w for w in (torch.complex128, torch.int64) if first.element_size() < w.itemsize
                 and row_bytes % w.itemsize == 0 and all(t.data_ptr() % w.itemsize == 0 for t in pk.layers)),
                None)
    if wide is None:
        return [layer.as_strided(shape, (width, 1)) for layer in pk.layers]
    return [layer.as_strided(shape, (width, 1)).view(wide) for layer in pk.layers]


def _whole_blocks(pk: PagedKV, slots: torch.Tensor) -> torch.Tensor | None:
    """The block ids when `slots` is whole blocks, each block's slots in order (no padding); else None."""
    bs = pk.block_size
    if slots.numel() % bs:
        return None
    grid = slots.view(-1, bs)
    first = grid[:, 0]
    if bool((first < 0).any()) or bool((first % bs).any()):
        return None
    if not torch.equal(grid - first[:, None], torch.arange(bs, dtype=slots.dtype, device=slots.device).expand_as(grid)):
        return None
    return first // bs


def _block_slab_width(pk: PagedKV) -> int | None:
    """Elements in one (kv, block) slab when it is contiguous in [BS, H, D] order (as in staging); else None."""
    row = pk.num_heads * pk.head_dim
    width = pk.block_size * row
    dense_heads = pk.num_heads == 1 or pk.stride_head == pk.head_dim
    if (pk.stride_dim == 1 and dense_heads and pk.stride_slot == row and pk.stride_block % width == 0
            and (pk.num_kv == 1 or pk.stride_kv % width == 0)):
        return width
    return None


def _block_rows_index(pk: PagedKV, blocks: torch.Tensor, width: int) -> torch.Tensor:
    kv = torch.arange(pk.num_kv, device=blocks.device) * pk.stride_kv
    return ((kv[:, None] + blocks.to(torch.int64)[None, :] * pk.stride_block) // width).reshape(-1)


def _block_runs(pk: PagedKV, blocks: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(first block, number of blocks, first token) of each run of consecutive blocks, when the runs are
    few enough that one strided copy per run and layer beats token rows; else None."""
    breaks = (torch.nonzero(blocks[1:] != blocks[:-1] + 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    layer_bytes = blocks.numel() * pk.block_size * pk.num_kv * pk.num_heads * pk.head_dim * pk.base.element_size()
    if layer_bytes < _MIN_RUN_BYTES * len(starts):
        return None
    firsts = blocks[starts].tolist()
    ends = [*breaks, blocks.numel()]
    return [(b, end - start, start * pk.block_size) for b, start, end in zip(firsts, starts, ends)]


def _run_views(pk: PagedKV, staging: torch.Tensor, runs):
    """(cache view, staging view) pairs, both [KV, n, BS, H, D], for every layer and run."""
    stage = as_int_bits(staging).view(pk.num_layers, pk.num_kv, -1, pk.block_size, pk.num_heads, pk.head_dim)
    for layer, dst in zip(pk.layers, stage):
        for block, count, token in runs:
            yield layer[:, block:block + count], dst[:, token // pk.block_size:token // pk.block_size + count]


def gather_kv_ref(kv_caches, slot_mapping, layout, out=None, *, validate=True):
    """`gather_kv` on the pure-torch path (the CPU production path and the tests' oracle)."""
    return _gather(kv_caches, slot_mapping, layout, out, validate, backend="torch")


def scatter_kv_ref(staging, kv_caches, slot_mapping, layout, *, validate=True):
    """`scatter_kv` on the pure-torch path."""
    _scatter(staging, kv_caches, slot_mapping, layout, validate, backend="torch")


def _block_plan(pk: PagedKV, slots: torch.Tensor):
    """(runs, index, width) for the block paths: runs to copy, or block-slab rows; all None otherwise."""
    blocks = _whole_blocks(pk, slots)
    if blocks is not None:
        runs = _block_runs(pk, blocks)
        if runs is not None:
            return runs, None, None
        width = _block_slab_width(pk)
        if width is not None:
            return None, _block_rows_index(pk, blocks, width), width
    return None, None, None


def _copy_runs(pk: PagedKV, staging: torch.Tensor, runs, to_staging: bool) -> None:
    """The block-runs path of both directions: one strided copy per layer and run."""
    for cache, stage in _run_views(pk, staging, runs):
        if to_staging:
            stage.copy_(cache)
        else:
            cache.copy_(stage)


def _gather_torch(pk: PagedKV, slots: torch.Tensor, out: torch.Tensor) -> None:
    runs, index, width = _block_plan(pk, slots)
    if runs is not None:
        return _copy_runs(pk, out, runs, to_staging=True)
    pad = None
    if index is None:
        width = _row_width(pk)
        pad = slots < 0
        index = _row_index(pk, slots.clamp(min=0), width)
    out_ints = as_int_bits(out)
    for rows, dst in zip(_row_views(pk, width), out_ints.view(pk.num_layers, -1, width)):
        torch.index_select(rows, 0, index, out=dst.view(rows.dtype))
    if pad is not None and pad.any():
        out_ints[:, :, pad] = 0


def _scatter_torch(pk: PagedKV, slots: torch.Tensor, staging: torch.Tensor) -> None:
    runs, index, width = _block_plan(pk, slots)
    if runs is not None:
        return _copy_runs(pk, staging, runs, to_staging=False)
    src = as_int_bits(staging)
    if index is None:
        width = _row_width(pk)
        keep = slots >= 0
        if not keep.all():
            slots, src = slots[keep], src[:, :, keep]
        index = _row_index(pk, slots, width)
    for rows, values in zip(_row_views(pk, width), src.reshape(pk.num_layers, -1, width)):
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
    check_slots(slot_mapping, pk, unique=False, validate=validate)
    num_tokens = slot_mapping.numel()
    if out is None:
        out = torch.empty(pk.staging_shape(num_tokens), dtype=pk.dtype, device=pk.base.device)
    else:
        check_staging(out, pk, num_tokens, "out")
    if num_tokens == 0:
        return out
    if use_triton(pk.base, backend):
        _launch(pk, slot_mapping, out, to_staging=True)
    else:
        _gather_torch(pk, slot_mapping, out)
    return out


def _scatter(staging, kv_caches, slot_mapping, layout, validate, backend=None):
    pk = resolve_paged(kv_caches, layout)
    check_slots(slot_mapping, pk, unique=True, validate=validate)
    check_staging(staging, pk, slot_mapping.numel(), "staging")
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
