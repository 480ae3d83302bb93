"""Exact per-token access to vLLM CPU_ATTN KV cache blocks, whatever ISA the C++ kernels use.

`gather_tokens` / `scatter_tokens` move the K/V of arbitrary slots between per-layer `(NB, H, BS, 2*D)`
caches and a canonical staging tensor `[L, 2, N, H, D]`, by element index (one `index_select` /
`index_copy_` per layer and chunk of tokens, no per-token Python loop), through the in-block element order
that `connectors.cpu_block_probe` proved from vLLM's own op. Slot -1 is padding: gather writes zeros there,
scatter skips it.

Strides. vLLM 0.32 builds each layer's tensor with `torch.as_strided` on one flat buffer
(`create_kv_cache_views`): the block stride may exceed the dense block size (other layers' pages in
between, page padding) and the storage offset is not zero, so `view(-1)` is not generally possible. The
CPU backend only accepts the LBHNC layout, in which a (block, head) tile's `BS x 2D` elements are dense;
the C++ op (and cpu_attn.py's `.view`) rely on exactly that, while taking the block and head strides from
the tensor. So do we: the block and head strides may be anything that does not overlap, the tile interior
must be dense (stride `(2*D, 1)` on the last two dims), and element offsets are computed from the strides
against a 1-D `as_strided` view of the layer's memory. (The probe runs on a dense scratch cache: that the
in-tile order does not depend on the block/head strides is checked against the op for "vec"/"vec16" in the
tests with vLLM's own `create_kv_cache_views`; for other ISAs it is an assumption, as vLLM's C++ code
addresses blocks and heads through the strides it is given.)

Only the unquantized caches (`kv_cache_dtype="auto"`: float32, bfloat16, float16) are covered: an fp8
cache quantizes on write, so its bytes are not the token's K/V.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cpu_block_probe import BlockLayout

# Elements per computed index (8 bytes each): gather/scatter work through the tokens in chunks of this size.
_INDEX_ELEMENTS = 1 << 22

# -- gather / scatter ----------------------------------------------------------------------------------------

def _check_layout(layout) -> None:
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout: expected a BlockLayout from probe_block_layout, got {type(layout).__name__}")


def _check_caches(caches, layout: BlockLayout) -> tuple[int, torch.device]:
    """Validate the per-layer caches; returns (num_blocks, device)."""
    if isinstance(caches, torch.Tensor) or not isinstance(caches, Sequence):
        raise ValueError("caches: expected a list of per-layer (NB, H, BS, 2*D) tensors, got "
                         f"{type(caches).__name__}")
    if not caches:
        raise ValueError("caches: empty list (no layers)")
    bs, h, d = layout.block_size, layout.num_heads, layout.head_dim
    first = caches[0]
    for i, t in enumerate(caches):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"caches[{i}]: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4 or tuple(t.shape[1:]) != (h, bs, 2 * d):
            raise ValueError(f"caches[{i}]: expected shape (NB, {h}, {bs}, {2 * d}) (NB, H, BS, 2*D) for "
                             f"{layout.name}, got {tuple(t.shape)}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"caches[{i}]: {t.shape[0]} blocks, caches[0] has {first.shape[0]}")
        if t.dtype != layout.dtype:
            raise ValueError(f"caches[{i}]: dtype {t.dtype}, the layout was probed for {layout.dtype}")
        if t.device != first.device:
            raise ValueError(f"caches[{i}]: on {t.device}, caches[0] on {first.device}")
        if t.shape[0] and (t.stride(3) != 1 or t.stride(2) != 2 * d):
            raise ValueError(f"caches[{i}]: strides {t.stride()}: each (block, head) tile must be dense (strides "
                             f"(..., {2 * d}, 1) on the last two dims), as vLLM's CPU kernels require")
        # (block, head) tiles must not overlap: sort the outer dims by stride, each must clear the inner ones
        extent = layout.tile_elements
        for size, stride in sorted(((t.shape[0], t.stride(0)), (h, t.stride(1))), key=lambda s: s[1]):
            if size > 1:
                if stride < extent:
                    raise ValueError(f"caches[{i}]: strides {t.stride()} make (block, head) tiles of "
                                     f"{layout.tile_elements} elements overlap")
                extent = stride * size
    return first.shape[0], first.device


def _check_slots(slots, num_blocks: int, layout: BlockLayout, device: torch.device) -> None:
    if not isinstance(slots, torch.Tensor):
        raise ValueError(f"slots: expected an int64 tensor, got {type(slots).__name__}")
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError(f"slots: expected a 1-D int64 tensor, got {slots.dim()}-D {slots.dtype}")
    if slots.device != device:
        raise ValueError(f"slots: on {slots.device}, the caches on {device}")
    if slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        limit = num_blocks * layout.block_size
        if lo < -1 or hi >= limit:
            raise ValueError(f"slots: values must be -1 (padding) or in [0, {limit}) ({num_blocks} blocks of "
                             f"{layout.block_size}), got min {lo} max {hi}")


def _element_index(layout: BlockLayout, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Offsets `[2, N, H, D]` (from `cache`'s storage offset) of each canonical element of `slots` (all >= 0)."""
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    phys = layout.canon_to_phys_4d.to(slots.device).index_select(1, offsets)  # [2, N, H, D] in-block
    tile = layout.tile_elements
    if cache.stride(1) != tile:  # head tiles not back to back: split the physical index into (head, in-tile)
        phys = (phys // tile) * cache.stride(1) + phys % tile
    return phys + (blocks * cache.stride(0)).view(1, -1, 1, 1)


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """A 1-D view of the memory the layer spans, from its first element (writes go through to the cache)."""
    span = 1 + sum((s - 1) * st for s, st in zip(cache.shape, cache.stride()))
    return cache.as_strided((span,), (1,), cache.storage_offset())


def _chunks(n: int, layout: BlockLayout) -> list[tuple[int, int]]:
    """Token ranges whose element index stays under _INDEX_ELEMENTS (int64: 32 MiB), whatever N."""
    step = max(1, _INDEX_ELEMENTS // (2 * layout.num_heads * layout.head_dim))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def _indices_per_layer(caches, layout: BlockLayout, slots: torch.Tensor):
    """Per layer, the flat element index `[2*N*H*D]` of `slots` (computed once per distinct stride)."""
    memo: dict[tuple[int, int], torch.Tensor] = {}
    for cache in caches:
        key = (cache.stride(0), cache.stride(1))
        if key not in memo:
            memo[key] = _element_index(layout, cache, slots).reshape(-1)
        yield cache, memo[key]


def gather_tokens(caches: Sequence[torch.Tensor], slots: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """K/V of `slots` from every layer, canonical: `[L, 2, N, H, D]` (K then V), the caches' dtype.

    caches: per-layer `(NB, H, BS, 2*D)` tensors as vLLM hands them over (strided views allowed, see the
        module doc). slots: int64 `[N]`, slot = block * BS + offset, any order, repeats allowed; -1 is
        padding and reads as zeros. layout: `probe_block_layout(...)` for the caches' ISA and shape.
    """
    _check_layout(layout)
    num_blocks, device = _check_caches(caches, layout)
    _check_slots(slots, num_blocks, layout, device)
    n, h, d = slots.numel(), layout.num_heads, layout.head_dim
    out = torch.empty((len(caches), 2, n, h, d), dtype=layout.dtype, device=device)
    if n == 0:
        return out
    pad = slots < 0
    has_pad = bool(pad.any())
    read = slots.clamp(min=0) if has_pad else slots  # padding reads slot 0, then is zeroed
    chunks = _chunks(n, layout)
    for start, end in chunks:
        for i, (cache, index) in enumerate(_indices_per_layer(caches, layout, read[start:end])):
            if len(chunks) == 1:  # straight into the output
                torch.index_select(_flat(cache), 0, index, out=out[i].view(-1))
            else:
                out[i, :, start:end] = _flat(cache).index_select(0, index).view(2, end - start, h, d)
    if has_pad:
        out[:, :, pad] = 0
    return out


def scatter_tokens(staging: torch.Tensor, caches: Sequence[torch.Tensor], slots: torch.Tensor,
                   layout: BlockLayout) -> None:
    """Write canonical K/V `staging` `[L, 2, N, H, D]` at `slots` into every layer's cache, in the op's layout.

    Byte for byte what vLLM's `cpu_attn_reshape_and_cache` would write for the same K/V and slots; no other
    element changes. Slot -1 is skipped; a slot may not appear twice (which write would win is undefined).
    """
    _check_layout(layout)
    num_blocks, device = _check_caches(caches, layout)
    _check_slots(slots, num_blocks, layout, device)
    n, h, d = slots.numel(), layout.num_heads, layout.head_dim
    want = (len(caches), 2, n, h, d)
    if not isinstance(staging, torch.Tensor):
        raise ValueError(f"staging: expected a tensor of shape {want}, got {type(staging).__name__}")
    if tuple(staging.shape) != want:
        raise ValueError(f"staging: expected shape {want} (L, 2, N, H, D), got {tuple(staging.shape)}")
    if staging.dtype != layout.dtype:
        raise ValueError(f"staging: dtype {staging.dtype}, the caches hold {layout.dtype} (no implicit casts)")
    if staging.device != device:
        raise ValueError(f"staging: on {staging.device}, the caches on {device}")
    keep = slots >= 0
    if not bool(keep.all()):
        kept = keep.nonzero().squeeze(1)
        slots, staging = slots.index_select(0, kept), staging.index_select(2, kept)
    if slots.numel() == 0:
        return
    uniq = torch.unique(slots)
    if uniq.numel() != slots.numel():
        sorted_slots = slots.sort().values
        dup = int(sorted_slots[1:][sorted_slots[1:] == sorted_slots[:-1]][0])
        raise ValueError(f"slots: slot {dup} appears more than once; scatter would write it twice")
    for start, end in _chunks(slots.numel(), layout):
        for i, (cache, index) in enumerate(_indices_per_layer(caches, layout, slots[start:end])):
            _flat(cache).index_copy_(0, index, staging[i, :, start:end].reshape(-1))
