"""Paged-cache addressing: where every element of a paged KV cache lives, for any layout, and the checks
of slot mappings and staging tensors against it; shared by the transfer (`paged_kv`: gather_kv / scatter_kv)
and the fused codecs (`quant_paged`).

Dims: L layers, KV = 2 (K, V) or 1 (MLA), NB paged blocks, BS block size, H kv heads, D head dim, N tokens.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from .bits import as_int_bits
from .layout import KVLayout

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
                    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


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
        first = layers[0]
        _check_dtype(first)
        ints = tuple(as_int_bits(t) for t in layers)
    else:
        if isinstance(kv_caches, torch.Tensor) or not isinstance(kv_caches, Sequence) or not kv_caches:
            raise TypeError(f"kv_caches: layout {layout} has no L dim, so expected a non-empty sequence of "
                            f"per-layer tensors, got {type(kv_caches).__name__} (wrap a single layer in a list)")
        for i, t in enumerate(kv_caches):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"kv_caches[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        raw = kv_caches[0]
        first = layout.canonical(raw)
        _check_dtype(first)
        key = (raw.shape, raw.dtype, raw.device, raw.stride())
        for i, t in enumerate(kv_caches[1:], start=1):
            if (t.shape, t.dtype, t.device, t.stride()) != key:
                _raise_layer_mismatch(i, t, raw)
        # Every layer has layer 0's geometry, so its canonical view is layer 0's sizes and strides at its own
        # storage offset (one call per layer instead of `canonical`'s dozen: this runs on every transfer).
        size, stride = first.shape, first.stride()
        ints = tuple(as_int_bits(t).as_strided(size, stride) for t in kv_caches)
    num_kv, num_blocks, block_size, num_heads, head_dim = first.shape
    s_kv, s_block, s_slot, s_head, s_dim = first.stride()
    offsets, offsets_gcd = _layer_offsets(tuple(t.data_ptr() for t in ints), first.element_size(), first.device)
    return PagedKV(ints, ints[0], offsets, offsets_gcd, first.dtype, num_kv, num_blocks, block_size, num_heads, head_dim,
                   layout.has_heads, s_kv, s_block, s_slot, s_head, s_dim)


def _raise_layer_mismatch(i: int, t: torch.Tensor, raw: torch.Tensor) -> None:
    for what, got, want in (("shape", t.shape, raw.shape), ("dtype", t.dtype, raw.dtype),
                            ("device", t.device, raw.device), ("strides", t.stride(), raw.stride())):
        if got != want:
            raise ValueError(f"kv_caches[{i}]: {what} {tuple(got) if what != 'dtype' else got} differs "
                             f"from layer 0's {tuple(want) if what != 'dtype' else want}")


def _check_dtype(first: torch.Tensor) -> None:
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kv_caches: dtype {first.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")


def check_slots(slot_mapping: torch.Tensor, pk: PagedKV, *, unique: bool, validate: bool) -> None:
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


def check_staging(t: torch.Tensor, pk: PagedKV, num_tokens: int, name: str) -> None:
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
