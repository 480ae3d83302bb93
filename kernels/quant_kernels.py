"""The Triton kernels of the lossy KV codecs: quantize or dequantize, in one launch for all layers, KV that
lives in a staging view or in a paged cache.

Dims: L layers, KV = 2 (K, V) or 1 (MLA), N tokens, H kv heads, D head dim, G scale groups along D, E
elements of a group that a program holds (the group size, halved for int4: a program holds the even element
of each packed pair and reads the odd one beside it). Grid: (token tiles of TOKEN_TILE, L * KV * H). A
program holds [TOKEN_TILE tokens, G groups, E elements] of one head, so a token tile's per-channel K scales
and the per-token groups along D both reduce inside it. Padding slots (-1) read as zeros, as `gather_kv`
gives them; writes skip them.
The codecs, their rounding and their data format: kernels/quant.py, whose launchers run these kernels on
staging tensors; kernels/quant_paged.py runs them on paged caches (gather + quantize, dequantize + scatter).

Arguments travel in four NamedTuples (Triton passes tuples into kernels; it cannot take a dataclass), named
alike in every kernel: x, a `KVView` (where the unquantized KV is); q, a `QuantView` (the QuantizedKV's
tensors); and two of constexprs, S, a `TileShape`, and C, a `Codec`.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bits import as_int_bits

# One program per (64-token tile, layer, kv, head): the tile is fixed by the K scale groups; 64 x D
# (64..128) elements is 4-8K per program on GPU; not yet swept on a GPU.
_NUM_WARPS = 4
_CODEC_ID = {"int8": 0, "fp8": 1, "int4": 2}  # the kernels' branches
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the kernels' float kinds


class KVView(NamedTuple):
    """Where the unquantized KV is, in elements of `base` (its bits as same-size ints).

    Staging view `[L, KV, N, H, D]`: (layer, kv, token, head, d) at layer * stride_layer + kv * stride_kv +
    token * stride_slot + head * stride_head + d * stride_dim. Paged cache (`paged_addressing.PagedKV`): token
    n at slot `slots[n]` = block * block_size + offset, at layer_offsets[layer] + kv * stride_kv + block *
    stride_block + offset * stride_slot + head * stride_head + d * stride_dim.
    """

    base: torch.Tensor
    layer_offsets: torch.Tensor | None  # paged: int64 [L]
    slots: torch.Tensor | None  # paged: int32/int64 [N], -1 = padding
    block_size: int  # paged
    stride_layer: int  # staging
    stride_kv: int
    stride_block: int  # paged
    stride_slot: int  # staging: the token stride
    stride_head: int
    stride_dim: int
    PAGED: tl.constexpr

    @classmethod
    def staging(cls, view: torch.Tensor) -> "KVView":
        """A staging view `[L, KV, N, H, D]`, any strides."""
        st = view.stride()
        return cls(as_int_bits(view), None, None, 1, st[0], st[1], 0, st[2], st[3], st[4], tl.constexpr(False))

    @classmethod
    def paged(cls, pk, slots: torch.Tensor) -> "KVView":
        """The paged cache `pk` (a `PagedKV`) at `slots`, a validated slot mapping on its device."""
        return cls(pk.base, pk.layer_offsets, slots, pk.block_size, 0, pk.stride_kv, pk.stride_block,
                   pk.stride_slot, pk.stride_head, pk.stride_dim, tl.constexpr(True))


class QuantView(NamedTuple):
    """A QuantizedKV's tensors as the kernels address them: data contiguous `[L, KV, N, H, D / STEP]`, and
    the bf16 scales' bits (int16) `[L, scales_per_layer]`, per layer K's section (k_section values) then V's."""

    data: torch.Tensor
    scales: torch.Tensor
    scales_per_layer: int
    k_section: int


class TileShape(NamedTuple):
    """Constexprs: the staging dims and this program's [BLOCK_N, BLOCK_G, BLOCK_E] tile of one head."""

    NUM_KV: tl.constexpr
    NUM_HEADS: tl.constexpr
    HEAD_DIM: tl.constexpr
    GROUP: tl.constexpr  # elements of D per per-token scale group
    NUM_GROUPS: tl.constexpr
    STEP: tl.constexpr  # 2 for int4 (two values per byte), else 1
    BLOCK_N: tl.constexpr  # tokens: the per-channel scales' token tile
    BLOCK_G: tl.constexpr
    BLOCK_E: tl.constexpr


class Codec(NamedTuple):
    """Constexprs: how values are coded, and the float kind of the unquantized side."""

    ID: tl.constexpr  # 0 int8, 1 fp8, 2 int4
    QMAX: tl.constexpr  # the largest code
    FIELDS: tl.constexpr  # bf16 values per scale group: 2 (scale, offset) for int4, else 1
    K_CHANNEL: tl.constexpr  # 1: K (kv 0) has per-channel scales; 0: every kv per-token ones
    KIND: tl.constexpr  # the unquantized floats: 0 fp32, 1 fp16, 2 bf16


class _Tile(NamedTuple):
    """Built inside the kernels: where this program's tile lives, and which of its elements are real."""

    x_offs: tl.tensor  # int64 [BLOCK_N, BLOCK_G, BLOCK_E] in x.base; int4's odd element is at + x.stride_dim
    x_mask: tl.tensor  # a real element at a real slot (not padding)
    t_ok: tl.tensor  # [BLOCK_N, BLOCK_G, 1]: a real (token, group) of the staging
    col_in: tl.tensor  # [1, BLOCK_G, BLOCK_E]: a real element of D
    is_channel: tl.tensor  # this kv's scales are per channel ...
    is_token: tl.tensor  # ... or per token (flags as tensors: the interpreter turns `tensor & bool` into int32)
    data_offs: tl.tensor  # in q.data
    t_offs: tl.tensor  # per-token scale group in q.scales
    c_offs: tl.tensor  # per-channel scale group in q.scales


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
def _tile(x, q, num_tokens, S, C):
    """This program's [BLOCK_N tokens, BLOCK_G groups, BLOCK_E elements] tile of one head (a `_Tile`)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1).to(tl.int64)  # (layer * NUM_KV + kv) * NUM_HEADS + head
    head = pid % S.NUM_HEADS
    kv = (pid // S.NUM_HEADS) % S.NUM_KV
    layer = pid // (S.NUM_HEADS * S.NUM_KV)
    tok = pid_n * S.BLOCK_N + tl.arange(0, S.BLOCK_N)
    tok_in = tok < num_tokens
    if x.PAGED:
        slot = tl.load(x.slots + tok, mask=tok_in, other=-1).to(tl.int64)
        valid = slot >= 0
        block = slot // x.block_size
        row = (tl.load(x.layer_offsets + layer) + kv * x.stride_kv + block * x.stride_block
               + (slot - block * x.block_size) * x.stride_slot + head * x.stride_head)
    else:
        valid = tok_in
        row = layer * x.stride_layer + kv * x.stride_kv + tok * x.stride_slot + head * x.stride_head
    g = tl.arange(0, S.BLOCK_G)[None, :, None]
    e = tl.arange(0, S.BLOCK_E)[None, None, :]
    d = g * S.GROUP + e * S.STEP  # STEP 2 (int4): the even element of each packed pair
    col_in = (g < S.NUM_GROUPS) & (e * S.STEP < S.GROUP) & (d < S.HEAD_DIM)
    tok3 = tok[:, None, None]
    is_channel = (kv + 0 * d) < C.K_CHANNEL
    is_token = (kv + 0 * g) >= C.K_CHANNEL
    data_offs = ((((layer * S.NUM_KV + kv) * num_tokens + tok3) * S.NUM_HEADS + head) * (S.HEAD_DIM // S.STEP)
                 + d // S.STEP)
    base = layer * q.scales_per_layer + kv * q.k_section
    t_offs = base + ((tok3 * S.NUM_HEADS + head) * S.NUM_GROUPS + g) * C.FIELDS
    c_offs = base + ((pid_n * S.NUM_HEADS + head) * S.HEAD_DIM + d) * C.FIELDS
    t_ok = (tok3 < num_tokens) & (g < S.NUM_GROUPS)
    # d in int64: a layout with D outermost has stride_dim ~ the cache's size, and d * stride_dim must not wrap
    x_offs = row[:, None, None] + d.to(tl.int64) * x.stride_dim
    return _Tile(x_offs, valid[:, None, None] & col_in, t_ok, col_in, is_channel, is_token, data_offs, t_offs,
                 c_offs)


@triton.jit
def _scale_fields(lo, hi, C):
    """(scale, offset, 1 / scale) of groups spanning [lo, hi], as stored (bf16); 1 / 0 -> 0."""
    if C.ID == 2:  # asymmetric: offset = bf16(min), scale = bf16((max - offset) / 15)
        off = _bf16(lo)
        s = _bf16(tl.math.div_rn(hi - off, C.QMAX))
    else:  # symmetric: scale = bf16(amax / QMAX)
        off = tl.zeros_like(lo)  # +0.0: x - off is x, -0.0 included
        amax = tl.maximum(hi, -lo)
        s = _bf16(tl.math.div_rn(tl.where(amax > 0, amax, 0.0), C.QMAX))  # never -0.0
    return s, off, tl.where(s > 0, tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0)), 0.0)


@triton.jit
def _quantize_kv_kernel(x, q, num_tokens, S, C):
    """Quantize one head's tile: scales per token (reduce along the group) and per channel (reduce over the
    tile's tokens) are both computed, and the kv's grouping picks one. STEP 2 (int4) splits even/odd."""
    t = _tile(x, q, num_tokens, S, C)
    inb = t.t_ok & t.col_in  # staging elements: padding slots take part, as the zeros gather_kv gives them
    x0 = _to_f32(tl.load(x.base + t.x_offs, mask=t.x_mask, other=0), C.KIND)
    x1 = x0
    if S.STEP == 2:
        x1 = _to_f32(tl.load(x.base + t.x_offs + x.stride_dim, mask=t.x_mask, other=0), C.KIND)
    lo0 = tl.where(inb, x0, float("inf"))
    hi0 = tl.where(inb, x0, -float("inf"))
    lo1 = tl.where(inb, x1, float("inf"))
    hi1 = tl.where(inb, x1, -float("inf"))
    t_lo = tl.minimum(tl.min(lo0, axis=2), tl.min(lo1, axis=2))[:, :, None]
    t_hi = tl.maximum(tl.max(hi0, axis=2), tl.max(hi1, axis=2))[:, :, None]
    # tokens past N and padded groups get 0, not inf (no inf - inf); the columns past D likewise
    t_s, t_lo, t_inv = _scale_fields(tl.where(t.t_ok, t_lo, 0.0), tl.where(t.t_ok, t_hi, 0.0), C)
    c_s0, c_lo0, c_inv0 = _scale_fields(tl.where(t.col_in, tl.min(lo0, axis=0)[None, :, :], 0.0),
                                        tl.where(t.col_in, tl.max(hi0, axis=0)[None, :, :], 0.0), C)
    y0 = (x0 - tl.where(t.is_channel, c_lo0, t_lo)) * tl.where(t.is_channel, c_inv0, t_inv)
    if C.ID == 0:
        tl.store(q.data + t.data_offs, tl.minimum(tl.maximum(_round_half_even(y0), -C.QMAX), C.QMAX).to(tl.int8),
                 mask=inb)
    elif C.ID == 1:
        tl.store(q.data + t.data_offs, tl.minimum(tl.maximum(y0, -C.QMAX), C.QMAX).to(tl.float8e4nv), mask=inb)
    else:
        c_s1, c_lo1, c_inv1 = _scale_fields(tl.where(t.col_in, tl.min(lo1, axis=0)[None, :, :], 0.0),
                                            tl.where(t.col_in, tl.max(hi1, axis=0)[None, :, :], 0.0), C)
        y1 = (x1 - tl.where(t.is_channel, c_lo1, t_lo)) * tl.where(t.is_channel, c_inv1, t_inv)
        q0 = tl.minimum(tl.maximum(_round_half_even(y0), 0.0), C.QMAX).to(tl.int32)
        q1 = tl.minimum(tl.maximum(_round_half_even(y1), 0.0), C.QMAX).to(tl.int32)
        tl.store(q.data + t.data_offs, (q0 | (q1 << 4)).to(tl.uint8), mask=inb)
        channel = t.col_in & t.is_channel
        tl.store(q.scales + t.c_offs + C.FIELDS, _bf16_hi(c_s1), mask=channel)
        tl.store(q.scales + t.c_offs + C.FIELDS + 1, _bf16_hi(c_lo1), mask=channel)
        tl.store(q.scales + t.t_offs + 1, _bf16_hi(t_lo), mask=t.t_ok & t.is_token)
        tl.store(q.scales + t.c_offs + 1, _bf16_hi(c_lo0), mask=channel)
    tl.store(q.scales + t.t_offs, _bf16_hi(t_s), mask=t.t_ok & t.is_token)
    tl.store(q.scales + t.c_offs, _bf16_hi(c_s0), mask=t.col_in & t.is_channel)


@triton.jit
def _dequantize_kv_kernel(x, q, num_tokens, S, C):
    """x^ = q * scale (+ offset for int4), cast to the unquantized dtype; padding slots are skipped."""
    t = _tile(x, q, num_tokens, S, C)
    t_mask = t.t_ok & t.is_token
    c_mask = t.col_in & t.is_channel
    raw = tl.load(q.data + t.data_offs, mask=t.t_ok & t.col_in)  # no `other`: the interpreter cannot cast to fp8
    s0 = tl.where(t.is_channel, _to_f32(tl.load(q.scales + t.c_offs, mask=c_mask, other=0), 2),
                  _to_f32(tl.load(q.scales + t.t_offs, mask=t_mask, other=0), 2))
    if C.ID == 2:
        b = raw.to(tl.int32)
        t_lo = _to_f32(tl.load(q.scales + t.t_offs + 1, mask=t_mask, other=0), 2)
        lo0 = tl.where(t.is_channel, _to_f32(tl.load(q.scales + t.c_offs + 1, mask=c_mask, other=0), 2), t_lo)
        s1 = tl.where(t.is_channel, _to_f32(tl.load(q.scales + t.c_offs + C.FIELDS, mask=c_mask, other=0), 2), s0)
        lo1 = tl.where(t.is_channel, _to_f32(tl.load(q.scales + t.c_offs + C.FIELDS + 1, mask=c_mask, other=0), 2),
                       t_lo)
        # q * scale is exact in fp32 (4 x 8 significant bits), so a fused multiply-add rounds the same
        tl.store(x.base + t.x_offs, _from_f32((b & 15).to(tl.float32) * s0 + lo0, C.KIND), mask=t.x_mask)
        tl.store(x.base + t.x_offs + x.stride_dim, _from_f32((b >> 4).to(tl.float32) * s1 + lo1, C.KIND),
                 mask=t.x_mask)
    else:
        tl.store(x.base + t.x_offs, _from_f32(raw.to(tl.float32) * s0, C.KIND), mask=t.x_mask)


def _launch(kernel, q, x: KVView) -> None:
    meta = q.meta
    L, num_kv, n, h, d = meta.dims
    step = 2 if meta.codec == "int4" else 1
    shape = TileShape(*map(tl.constexpr, (
        num_kv, h, d, meta.group_size, meta.num_groups, step, meta.token_tile,
        triton.next_power_of_2(meta.num_groups), triton.next_power_of_2(meta.group_size // step))))
    codec = Codec(*map(tl.constexpr, (_CODEC_ID[meta.codec], meta.qmax, meta.fields,
                                       int(meta.k_grouping == "channel"), _KIND[meta.torch_dtype])))
    # contiguous: a no-op for launch_quantize's output; a QuantizedKV read back may hold views
    quant = QuantView(q.data.contiguous(), q.scales.contiguous().view(torch.int16), q.scales.shape[1],
                      meta.section_sizes()[0])
    kernel[(triton.cdiv(n, meta.token_tile), L * num_kv * h)](
        x, quant, n, shape, codec, num_warps=_NUM_WARPS,
        enable_fp_fusion=False,  # no contraction of x * inv with the rounding's subtraction: torch-exact
    )


def launch_quantize(q, x: KVView) -> None:
    """Quantize the KV at `x` into `q` (a `QuantizedKV` from `empty_quantized`: contiguous, written in place)."""
    assert q.data.is_contiguous() and q.scales.is_contiguous(), "q: the kernel writes contiguous data and scales"
    _launch(_quantize_kv_kernel, q, x)


def launch_dequantize(q, x: KVView) -> None:
    """Dequantize `q` (a `QuantizedKV`) into the KV at `x`, in place; padding slots are skipped."""
    _launch(_dequantize_kv_kernel, q, x)
