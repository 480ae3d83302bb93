"""The quantize / dequantize kernels, and their fused forms: gather + quantize and dequantize + scatter.

Dims: L layers, KV = 2 (K, V) or 1 (MLA), N tokens, NB blocks, BS block size, H kv heads, D head dim.
One kernel reads any paged cache (addressed as `kernels.paged_kv.PagedKV` describes, via `slot_mapping`)
or a staging tensor (the trivial case, slot = token), so `gather_kv_quantized` reads each cache element
once and writes only quantized bytes; `scatter_kv_dequantized` is the mirror. Grid: (token tiles of
TOKEN_TILE, L * KV * H), one launch for all layers. A program holds [TOKEN_TILE tokens, G groups, E
elements] of one head, so a 64-token tile's per-channel K scales and the per-token groups along D both
reduce inside it. Padding slots (-1) gather as zeros, like `gather_kv`; the scatter skips them.
The codec math and data format: kernels/quant.py.
"""

import torch
import triton
import triton.language as tl

from ._env import use_triton
from .bits import as_int_bits
from .paged_addressing import PagedKV, check_slots, resolve_paged
from .paged_kv import gather_kv_ref, scatter_kv_ref
from .quant import (_CODEC_ID, _QMAX, FLOAT_DTYPES, QuantizedKV, dequantize_kv_ref, empty_quantized, make_meta,
                    quantize_kv_ref)

# One program per (64-token tile, layer, kv, head): TOKEN_TILE is fixed by the K scale groups; 64 x D
# (64..128) elements is 4-8K per program on GPU; not yet swept on a GPU.
_NUM_WARPS = 4
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernels' float kinds


@triton.jit
def _round_half_even(y):
    """torch.round for |y| < 2**22: exact fp32 ops only, so fusion or reordering cannot change it."""
    f = tl.floor(y)
    r = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return f + ((r > 0.5) | ((r == 0.5) & odd)).to(tl.float32)


# Floats cross memory as same-size ints and are converted by bit operations: Triton's interpreter
# truncates fp32 -> bf16 (the GPU rounds half to even), so `.to(tl.bfloat16)` would differ between the two.
@triton.jit
def _to_f32(raw, KIND: tl.constexpr):
    """raw int bits of a KIND (0 fp32, 1 fp16, 2 bf16) float -> fp32 value."""
    if KIND == 2:
        return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        return raw.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return raw.to(tl.float32, bitcast=True)


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16, round half to even (finite x), as the upper half of a uint32."""
    b = x.to(tl.uint32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16


@triton.jit
def _bf16(x):
    """x rounded to bf16, as an fp32 value."""
    return _bf16_bits(x).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_hi(x):
    """The bf16 bits of an fp32 value that is already a bf16 value (int16, to store)."""
    return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.int16)


@triton.jit
def _from_f32(x, KIND: tl.constexpr):
    """fp32 value -> the int bits of a KIND float (round half to even)."""
    if KIND == 2:
        return (_bf16_bits(x) >> 16).to(tl.int16)
    elif KIND == 1:
        return x.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        return x.to(tl.int32, bitcast=True)


@triton.jit
def _tile(num_tokens, slot_ptr, layer_offsets_ptr, block_size, stride_layer, stride_kv, stride_block,
          stride_slot, stride_head, scales_per_layer, k_section, NUM_KV: tl.constexpr, NUM_HEADS: tl.constexpr,
          HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr,
          BLOCK_E: tl.constexpr, STEP: tl.constexpr, C: tl.constexpr, K_CHANNEL: tl.constexpr,
          PAGED: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_N tokens, BLOCK_G groups, BLOCK_E elements] tile of one head: where it lives in
    the KV source (row + d * stride_dim), in `data`, and in `scales` (per token and per channel), and masks."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1).to(tl.int64)  # (layer * NUM_KV + kv) * NUM_HEADS + head
    head = pid % NUM_HEADS
    kv = (pid // NUM_HEADS) % NUM_KV
    layer = pid // (NUM_HEADS * NUM_KV)
    tok = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_in = tok < num_tokens
    if PAGED:
        slot = tl.load(slot_ptr + tok, mask=tok_in, other=-1).to(tl.int64)
        valid = slot >= 0
        block = slot // block_size
        row = (tl.load(layer_offsets_ptr + layer) + kv * stride_kv + block * stride_block
               + (slot - block * block_size) * stride_slot + head * stride_head)
    else:
        valid = tok_in
        row = layer * stride_layer + kv * stride_kv + tok * stride_slot + head * stride_head
    g = tl.arange(0, BLOCK_G)[None, :, None]
    e = tl.arange(0, BLOCK_E)[None, None, :]
    d = g * GROUP + e * STEP  # STEP 2 (int4): the even element of each packed pair
    col_in = (g < NUM_GROUPS) & (e * STEP < GROUP) & (d < HEAD_DIM)
    tok3 = tok[:, None, None]
    # K_CHANNEL = 1: kv 0 (K) has per-channel scales; 0: every kv per-token ones. Flags are tensors, not
    # scalars: the interpreter turns `tensor & scalar bool` into int32 (triton 3.9).
    is_channel = (kv + 0 * d) < K_CHANNEL
    is_token = (kv + 0 * g) >= K_CHANNEL
    data_offs = (((layer * NUM_KV + kv) * num_tokens + tok3) * NUM_HEADS + head) * (HEAD_DIM // STEP) + d // STEP
    base = layer * scales_per_layer + kv * k_section
    t_offs = base + ((tok3 * NUM_HEADS + head) * NUM_GROUPS + g) * C
    c_offs = base + ((pid_n * NUM_HEADS + head) * HEAD_DIM + d) * C
    t_ok = (tok3 < num_tokens) & (g < NUM_GROUPS)  # a real (token, group) of the staging
    return row[:, None, None], valid[:, None, None] & col_in, t_ok, d, col_in, is_channel, is_token, data_offs, \
        t_offs, c_offs


@triton.jit
def _scale_fields(lo, hi, CODEC: tl.constexpr, QMAX: tl.constexpr):
    """(scale, offset, 1 / scale) of groups spanning [lo, hi], as stored (bf16); 1 / 0 -> 0."""
    if CODEC == 2:  # asymmetric: offset = bf16(min), scale = bf16((max - offset) / 15)
        off = _bf16(lo)
        s = _bf16(tl.math.div_rn(hi - off, QMAX))
    else:  # symmetric: scale = bf16(amax / QMAX)
        off = tl.zeros_like(lo)  # +0.0: x - off is x, -0.0 included
        amax = tl.maximum(hi, -lo)
        s = _bf16(tl.math.div_rn(tl.where(amax > 0, amax, 0.0), QMAX))  # never -0.0
    return s, off, tl.where(s > 0, tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0)), 0.0)


@triton.jit
def _quantize_kv_kernel(
    src_ptr, layer_offsets_ptr, slot_ptr, data_ptr, scale_ptr,
    num_tokens, block_size, stride_layer, stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    scales_per_layer, k_section,
    NUM_KV: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, STEP: tl.constexpr,
    CODEC: tl.constexpr, QMAX: tl.constexpr, C: tl.constexpr, KIND: tl.constexpr, K_CHANNEL: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Quantize one head's tile: scales per token (reduce along the group) and per channel (reduce over the
    tile's tokens) are both computed, and the kv's grouping picks one. STEP 2 (int4) splits even/odd."""
    row, load_mask, t_ok, d, col_in, is_channel, is_token, data_offs, t_offs, c_offs = _tile(
        num_tokens, slot_ptr, layer_offsets_ptr, block_size, stride_layer, stride_kv, stride_block, stride_slot,
        stride_head, scales_per_layer, k_section, NUM_KV, NUM_HEADS, HEAD_DIM, GROUP, NUM_GROUPS, BLOCK_G,
        BLOCK_E, STEP, C, K_CHANNEL, PAGED, BLOCK_N)
    inb = t_ok & col_in  # staging elements: padding slots take part, as the zeros gather_kv gives them
    x0 = _to_f32(tl.load(src_ptr + row + d * stride_dim, mask=load_mask, other=0), KIND)
    x1 = x0
    if STEP == 2:
        x1 = _to_f32(tl.load(src_ptr + row + (d + 1) * stride_dim, mask=load_mask, other=0), KIND)
    lo0 = tl.where(inb, x0, float("inf"))
    hi0 = tl.where(inb, x0, -float("inf"))
    lo1 = tl.where(inb, x1, float("inf"))
    hi1 = tl.where(inb, x1, -float("inf"))
    t_lo = tl.minimum(tl.min(lo0, axis=2), tl.min(lo1, axis=2))[:, :, None]
    t_hi = tl.maximum(tl.max(hi0, axis=2), tl.max(hi1, axis=2))[:, :, None]
    # tokens past N and padded groups get 0, not inf (no inf - inf); the columns past D likewise
    t_s, t_lo, t_inv = _scale_fields(tl.where(t_ok, t_lo, 0.0), tl.where(t_ok, t_hi, 0.0), CODEC, QMAX)
    c_s0, c_lo0, c_inv0 = _scale_fields(tl.where(col_in, tl.min(lo0, axis=0)[None, :, :], 0.0),
                                        tl.where(col_in, tl.max(hi0, axis=0)[None, :, :], 0.0), CODEC, QMAX)
    y0 = (x0 - tl.where(is_channel, c_lo0, t_lo)) * tl.where(is_channel, c_inv0, t_inv)
    if CODEC == 0:
        tl.store(data_ptr + data_offs, tl.minimum(tl.maximum(_round_half_even(y0), -QMAX), QMAX).to(tl.int8),
                 mask=inb)
    elif CODEC == 1:
        tl.store(data_ptr + data_offs, tl.minimum(tl.maximum(y0, -QMAX), QMAX).to(tl.float8e4nv), mask=inb)
    else:
        c_s1, c_lo1, c_inv1 = _scale_fields(tl.where(col_in, tl.min(lo1, axis=0)[None, :, :], 0.0),
                                            tl.where(col_in, tl.max(hi1, axis=0)[None, :, :], 0.0), CODEC, QMAX)
        y1 = (x1 - tl.where(is_channel, c_lo1, t_lo)) * tl.where(is_channel, c_inv1, t_inv)
        q0 = tl.minimum(tl.maximum(_round_half_even(y0), 0.0), QMAX).to(tl.int32)
        q1 = tl.minimum(tl.maximum(_round_half_even(y1), 0.0), QMAX).to(tl.int32)
        tl.store(data_ptr + data_offs, (q0 | (q1 << 4)).to(tl.uint8), mask=inb)
        tl.store(scale_ptr + c_offs + C, _bf16_hi(c_s1), mask=col_in & is_channel)
        tl.store(scale_ptr + c_offs + C + 1, _bf16_hi(c_lo1), mask=col_in & is_channel)
        tl.store(scale_ptr + t_offs + 1, _bf16_hi(t_lo), mask=t_ok & is_token)
        tl.store(scale_ptr + c_offs + 1, _bf16_hi(c_lo0), mask=col_in & is_channel)
    tl.store(scale_ptr + t_offs, _bf16_hi(t_s), mask=t_ok & is_token)
    tl.store(scale_ptr + c_offs, _bf16_hi(c_s0), mask=col_in & is_channel)


@triton.jit
def _dequantize_kv_kernel(
    dst_ptr, layer_offsets_ptr, slot_ptr, data_ptr, scale_ptr,
    num_tokens, block_size, stride_layer, stride_kv, stride_block, stride_slot, stride_head, stride_dim,
    scales_per_layer, k_section,
    NUM_KV: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    NUM_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, STEP: tl.constexpr,
    CODEC: tl.constexpr, QMAX: tl.constexpr, C: tl.constexpr, KIND: tl.constexpr, K_CHANNEL: tl.constexpr,
    PAGED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """x^ = q * scale (+ offset for int4), cast to the destination dtype; padding slots are skipped."""
    row, store_mask, t_ok, d, col_in, is_channel, is_token, data_offs, t_offs, c_offs = _tile(
        num_tokens, slot_ptr, layer_offsets_ptr, block_size, stride_layer, stride_kv, stride_block, stride_slot,
        stride_head, scales_per_layer, k_section, NUM_KV, NUM_HEADS, HEAD_DIM, GROUP, NUM_GROUPS, BLOCK_G,
        BLOCK_E, STEP, C, K_CHANNEL, PAGED, BLOCK_N)
    t_mask = t_ok & is_token
    c_mask = col_in & is_channel
    raw = tl.load(data_ptr + data_offs, mask=t_ok & col_in)  # no `other`: the interpreter cannot cast to fp8
    s0 = tl.where(is_channel, _to_f32(tl.load(scale_ptr + c_offs, mask=c_mask, other=0), 2),
                  _to_f32(tl.load(scale_ptr + t_offs, mask=t_mask, other=0), 2))
    if CODEC == 2:
        b = raw.to(tl.int32)
        t_lo = _to_f32(tl.load(scale_ptr + t_offs + 1, mask=t_mask, other=0), 2)
        lo0 = tl.where(is_channel, _to_f32(tl.load(scale_ptr + c_offs + 1, mask=c_mask, other=0), 2), t_lo)
        s1 = tl.where(is_channel, _to_f32(tl.load(scale_ptr + c_offs + C, mask=c_mask, other=0), 2), s0)
        lo1 = tl.where(is_channel, _to_f32(tl.load(scale_ptr + c_offs + C + 1, mask=c_mask, other=0), 2), t_lo)
        # q * scale is exact in fp32 (4 x 8 significant bits), so a fused multiply-add rounds the same
        tl.store(dst_ptr + row + d * stride_dim, _from_f32((b & 15).to(tl.float32) * s0 + lo0, KIND),
                 mask=store_mask)
        tl.store(dst_ptr + row + (d + 1) * stride_dim, _from_f32((b >> 4).to(tl.float32) * s1 + lo1, KIND),
                 mask=store_mask)
    else:
        tl.store(dst_ptr + row + d * stride_dim, _from_f32(raw.to(tl.float32) * s0, KIND), mask=store_mask)


def _launch(kernel, q: QuantizedKV, kv_view: torch.Tensor | None, paged: tuple[PagedKV, torch.Tensor] | None):
    """Run `kernel` between q and a staging view `[L, KV, N, H, D]` or a (PagedKV, slot_mapping) pair."""
    meta = q.meta
    L, num_kv, n, h, d = meta.dims
    if paged is not None:
        pk, slots = paged
        src = pk.base  # same-size ints
        offsets, block_size = pk.layer_offsets, pk.block_size
        strides = (0, pk.stride_kv, pk.stride_block, pk.stride_slot, pk.stride_head, pk.stride_dim)
    else:
        src = as_int_bits(kv_view)
        slots, offsets, block_size = src, src, 1  # unused when not PAGED
        st = kv_view.stride()
        strides = (st[0], st[1], 0, st[2], st[3], st[4])
    step = 2 if meta.codec == "int4" else 1
    sections = meta.section_sizes()
    grid = (triton.cdiv(n, meta.token_tile), L * num_kv * h)
    kernel[grid](
        src, offsets, slots, q.data, q.scales.view(torch.int16), n, block_size, *strides, q.scales.shape[1],
        sections[0],
        NUM_KV=num_kv, NUM_HEADS=h, HEAD_DIM=d, GROUP=meta.group_size, NUM_GROUPS=meta.num_groups,
        BLOCK_G=triton.next_power_of_2(meta.num_groups), BLOCK_E=triton.next_power_of_2(meta.group_size // step),
        STEP=step, CODEC=_CODEC_ID[meta.codec], QMAX=_QMAX[meta.codec], C=meta.fields,
        KIND=_KIND[meta.torch_dtype], K_CHANNEL=int(meta.k_grouping == "channel"),
        PAGED=paged is not None, BLOCK_N=meta.token_tile, num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # no contraction of x * inv with the rounding's subtraction: torch-exact
    )


def launch_quantize(q: QuantizedKV, staging=None, paged=None) -> None:
    _launch(_quantize_kv_kernel, q, staging, paged)


def launch_dequantize(q: QuantizedKV, out=None, paged=None) -> None:
    _launch(_dequantize_kv_kernel, q, out, paged)


# ---------------------------------------------------------------------------------------------------------
# Fused entry points and their pure-torch references (gather_kv_ref + quantize_kv_ref, and the mirror).
# ---------------------------------------------------------------------------------------------------------


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
    launch_quantize(q, paged=(pk, slot_mapping))
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
        launch_dequantize(q, paged=(pk, slot_mapping))
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
