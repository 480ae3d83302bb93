"""The lossy codecs fused with the paged transfer: gather + quantize and dequantize + scatter, one pass.

Dims: L layers, KV = 2 (K, V) or 1 (MLA), N tokens, NB blocks, BS block size, H kv heads, D head dim.
`gather_kv_quantized` reads each cache element of `slot_mapping`'s slots once (addressed as
`kernels.paged_addressing.PagedKV` describes) and writes only quantized bytes: the same QuantizedKV as
`quantize_kv(gather_kv(...))`. `scatter_kv_dequantized` is the mirror. Padding slots (-1) gather as zeros,
like `gather_kv`; the scatter skips them. The codecs and their format: kernels/quant.py; the kernels, which
read a paged cache or a staging view alike: kernels/quant_kernels.py.
"""

import torch

from ._env import use_triton
from .paged_addressing import PagedKV, check_slots, resolve_paged
from .paged_kv import gather_kv_ref, scatter_kv_ref
from .quant import FLOAT_DTYPES, QuantizedKV, dequantize_kv_ref, empty_quantized, make_meta, quantize_kv_ref
from .quant_kernels import KVView, launch_dequantize, launch_quantize


def _resolve(kv_caches, slot_mapping, layout, unique: bool, validate: bool) -> PagedKV:
    pk = resolve_paged(kv_caches, layout)
    if pk.dtype not in FLOAT_DTYPES:
        raise TypeError(f"kv_caches: quantized transfer needs a bfloat16, float16 or float32 cache, got {pk.dtype}")
    check_slots(slot_mapping, pk, unique=unique, validate=validate)
    return pk


def _gather_quantized(kv_caches, slot_mapping, layout, codec, k_grouping, group_size, validate, backend):
    pk = _resolve(kv_caches, slot_mapping, layout, unique=False, validate=validate)
    shape = pk.staging_shape(slot_mapping.numel())
    meta = make_meta(torch.empty(shape, dtype=pk.dtype, device="meta"), codec, k_grouping, group_size)
    if slot_mapping.numel() == 0 or not use_triton(pk.base, backend):
        staging = gather_kv_ref(kv_caches, slot_mapping, layout, validate=False)
        return quantize_kv_ref(staging, codec, k_grouping=k_grouping, group_size=group_size)
    q = empty_quantized(meta, pk.base.device)
    launch_quantize(q, KVView.paged(pk, slot_mapping))
    return q


def _scatter_dequantized(q, kv_caches, slot_mapping, layout, validate, backend):
    if not isinstance(q, QuantizedKV):
        raise TypeError(f"q: expected a QuantizedKV, got {type(q).__name__}")
    pk = _resolve(kv_caches, slot_mapping, layout, unique=True, validate=validate)
    expected = pk.staging_shape(slot_mapping.numel())
    if tuple(q.meta.shape) != expected or q.meta.torch_dtype != pk.dtype:
        raise ValueError(f"q: holds {q.meta.dtype} {tuple(q.meta.shape)}, but these caches and "
                         f"{slot_mapping.numel()} slots need {pk.dtype} {expected}")
    if q.data.device != pk.base.device:
        raise ValueError(f"q: on {q.data.device}, the caches on {pk.base.device}")
    if slot_mapping.numel() == 0:
        return
    if use_triton(pk.base, backend):
        launch_dequantize(q, KVView.paged(pk, slot_mapping))
    else:
        scatter_kv_ref(dequantize_kv_ref(q), kv_caches, slot_mapping, layout, validate=False)


def gather_kv_quantized(kv_caches, slot_mapping, layout, codec="int8", *, k_grouping=None, group_size=None,
                        validate=True) -> QuantizedKV:
    """`quantize_kv(gather_kv(kv_caches, slot_mapping, layout), codec)` in one pass over the caches."""
    return _gather_quantized(kv_caches, slot_mapping, layout, codec, k_grouping, group_size, validate, None)


def gather_kv_quantized_ref(kv_caches, slot_mapping, layout, codec="int8", *, k_grouping=None,
                            group_size=None, validate=True) -> QuantizedKV:
    """`gather_kv_quantized` on the pure-torch path."""
    return _gather_quantized(kv_caches, slot_mapping, layout, codec, k_grouping, group_size, validate, "torch")


def scatter_kv_dequantized(q, kv_caches, slot_mapping, layout, *, validate=True) -> None:
    """`scatter_kv(dequantize_kv(q), kv_caches, slot_mapping, layout)` in one pass (in place; -1 skipped)."""
    _scatter_dequantized(q, kv_caches, slot_mapping, layout, validate, None)


def scatter_kv_dequantized_ref(q, kv_caches, slot_mapping, layout, *, validate=True) -> None:
    """`scatter_kv_dequantized` on the pure-torch path."""
    _scatter_dequantized(q, kv_caches, slot_mapping, layout, validate, "torch")
