"""int8 / fp8 / int4 KV codecs: Triton == torch reference (bytes), error bounds from the codec's math,
the targets on real KV, and the fused gather + quantize / dequantize + scatter paths for every layout."""

import json

import pytest
import torch

from kernels import KVLayout, gather_kv, scatter_kv_ref
from kernels.quant import (
    QUANT_CODECS,
    QuantizedKV,
    QuantMeta,
    dequantize_kv,
    dequantize_kv_ref,
    quantize_kv,
    quantize_kv_ref,
)
from kernels.quant_paged import (
    gather_kv_quantized,
    gather_kv_quantized_ref,
    scatter_kv_dequantized,
    scatter_kv_dequantized_ref,
)
from tests.helpers import assert_bytes_equal, real_kv
from tests.kernels.test_paged_kv import layer_views, make_caches, random_slots

# Unit roundoff of the staging dtype (RNE: |fl(v) - v| <= u |v|): bf16 has 8 significant bits, fp16 11.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}


def kv_like(shape, dtype):
    """Gaussian KV with K-style outlier channels and a per-channel offset (post-RoPE K has both)."""
    x = torch.randn(shape)
    x[..., 3] *= 12.0
    x[..., 5] += 4.0
    x.view(-1)[::97] = -0.0  # signed zeros must encode the same on both paths (fp8 has a -0)
    return x.to(dtype)


def assert_fp8_equal(actual: torch.Tensor, expected: torch.Tensor, what: str):
    """fp8 bytes equal; on CPU the interpreter's fp32 -> e4m3 cast may round a tie up instead of to even
    (one ulp) or lose the carry into the exponent when rounding up to a power of two (gives half of it):
    only those two known defects are let through, and only when the tensors are not on CUDA."""
    if actual.is_cuda:
        assert_bytes_equal(actual, expected, what)
        return
    a, e = actual.float(), expected.float()
    diff = actual.view(torch.uint8) != expected.view(torch.uint8)
    ulp = torch.where(e.abs() >= 2.0**-6, 2.0 ** (torch.floor(torch.log2(e.abs())) - 3), torch.tensor(2.0**-9))
    one_ulp = (a != e) & ((a - e).abs() <= ulp)  # not -0.0 vs +0.0: that would be our bug, not Triton's
    lost_carry = (e != 0) & (a * 2 == e) & (torch.log2(e.abs()) == torch.floor(torch.log2(e.abs())))
    bad = diff & ~one_ulp & ~lost_carry
    assert not bad.any(), f"{what}: {int(bad.sum())} fp8 values differ beyond the interpreter's known defects"
    assert diff.float().mean() < 0.1, f"{what}: {int(diff.sum())} of {diff.numel()} fp8 values differ"


def assert_quantized_equal(a: QuantizedKV, b: QuantizedKV, what: str):
    assert a.meta == b.meta, f"{what}: meta {a.meta} != {b.meta}"
    assert_bytes_equal(a.scales, b.scales, f"{what}: scales")
    if a.meta.codec == "fp8":
        assert_fp8_equal(a.data, b.data, f"{what}: data")
    else:
        assert_bytes_equal(a.data, b.data, f"{what}: data")


SHAPES = [
    pytest.param((2, 2, 1, 1, 64), torch.bfloat16, id="N1-H1-D64-bf16"),
    pytest.param((2, 2, 7, 3, 80), torch.float16, id="N7-H3-D80-fp16"),
    pytest.param((1, 2, 130, 3, 64), torch.bfloat16, id="N130-H3-D64-bf16"),
    pytest.param((2, 2, 70, 1, 128), torch.float32, id="N70-H1-D128-fp32"),
    pytest.param((2, 1, 65, 576), torch.bfloat16, id="mla-N65-D576-bf16"),
]


@pytest.mark.parametrize("codec", QUANT_CODECS)
@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_triton_matches_reference(shape, dtype, codec, device):
    x = kv_like(shape, dtype).to(device)
    q = quantize_kv(x, codec)
    ref = quantize_kv_ref(x, codec)
    assert_quantized_equal(q, ref, f"quantize_kv {codec}")
    out = dequantize_kv(ref)  # same input bytes: dequantization is exact for every codec
    assert out.dtype == dtype and out.shape == x.shape
    assert_bytes_equal(out, dequantize_kv_ref(ref), f"dequantize_kv {codec}")


@pytest.mark.parametrize("codec", QUANT_CODECS)
def test_non_contiguous_staging(codec, device):
    x = kv_like((2, 7, 2, 3, 80), torch.bfloat16).to(device).transpose(1, 2)[..., 8:72]  # [L, KV, N, H, D=64]
    assert not x.is_contiguous()
    assert_quantized_equal(quantize_kv(x, codec), quantize_kv_ref(x.contiguous(), codec), f"strided {codec}")


def _elements(q: QuantizedKV, x: torch.Tensor):
    """Per element: fp32 scale, offset, x / scale and q * scale (+ offset) in float64 (exact)."""
    L, KV, N, H, D = q.meta.dims
    s_all, lo_all = [], []
    for kv in range(KV):
        g = q.scale_groups(kv).double()
        if kv == 0 and q.meta.k_grouping == "channel":  # [L, NT, H, D, C] -> per token
            g = g.repeat_interleave(q.meta.token_tile, 1)[:, :N]
        else:  # [L, N, H, G, C] -> per element along D
            g = g.repeat_interleave(q.meta.group_size, 3)[:, :, :, :D]
        s_all.append(g[..., 0])
        lo_all.append(g[..., 1] if q.meta.fields == 2 else torch.zeros_like(g[..., 0]))
    return torch.stack(s_all, 1).reshape(x.shape), torch.stack(lo_all, 1).reshape(x.shape)


@pytest.mark.parametrize("codec", QUANT_CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_error_within_codec_bound(codec, dtype):
    """Bounds per element, from the codec's math (s: the stored scale, v = q*s (+lo) exact, x^ = fl(v)):
    - int8: y = fl(x * fl(1/s)) is within 2^-16 of x/s (|y| <= 128, two fp32 roundings), q = round(y) and
      clamping at 127 costs at most 127 * 2^-8 < 1/2 (s = bf16(amax/127) is at most 2^-9 low):
      |x - v| <= s (1/2 + 2^-16).
    - int4 (asym): the same with y = (x - lo) * fl(1/s), plus what rounding lo = bf16(min) up can add
      below it: |x - v| <= s (1/2 + 2^-16) + 2^-8 |lo| (1 + 2^-7).
    - fp8 e4m3: 3 mantissa bits, RNE: |y - fp8(y)| <= 2^-4 |y| (normal) or 2^-10 (subnormal, spacing 2^-9):
      |x - v| <= s (2^-4 |y| + 2^-10 + 2^-16).
    Then the cast to the staging dtype adds u |v|."""
    shape = (2, 2, 130, 3, 80)
    x = kv_like(shape, dtype)
    q = quantize_kv_ref(x, codec)
    xh = dequantize_kv_ref(q).double()
    s, lo = _elements(q, x)
    xd = x.double()
    if codec == "int8":
        v_err = s * (0.5 + 2**-16)
    elif codec == "int4":
        v_err = s * (0.5 + 2**-16) + 2**-8 * lo.abs() * (1 + 2**-7)
    else:
        v_err = s * (2**-4 * (xd / s.clamp(min=1e-30)).abs() + 2**-10 + 2**-16)
    bound = v_err * (1 + 2**-20) + UNIT_ROUNDOFF[dtype] * (xh.abs() + v_err)
    excess = (xd - xh).abs() - bound
    worst = excess.argmax()
    assert excess.max() <= 0, (f"{codec} {dtype}: |x - x^| exceeds the bound by {excess.max().item():.3g} "
                               f"at flat index {worst.item()} (x={xd.flatten()[worst].item()}, "
                               f"x^={xh.flatten()[worst].item()})")
    assert (xd - xh).abs().max() > 0.05 * bound.max(), "the bound is loose to the point of meaning nothing"


def test_error_targets_on_real_kv(device):
    """The issue's targets on SmolLM2-135M's real post-RoPE KV: ratio vs bf16 (scales counted), rel. L2."""

    kv = real_kv().to(device)
    targets = {"int8": (1.9, 0.01), "fp8": (1.9, 0.03), "int4": (3.5, 0.08)}
    for codec, (min_ratio, max_err) in targets.items():
        q = quantize_kv_ref(kv, codec)
        err = ((dequantize_kv_ref(q).float() - kv.float()).norm() / kv.float().norm()).item()
        ratio = kv.numel() * 2 / (q.nbytes + len(json.dumps(q.meta.to_dict())))
        assert err <= max_err, f"{codec}: relative L2 error {err:.4f} > {max_err}"
        assert ratio >= min_ratio, f"{codec}: ratio {ratio:.3f} < {min_ratio}"
    part = kv[:1, :, :64].contiguous()  # the kernels on real values too (small: the interpreter is slow)
    for codec in QUANT_CODECS:
        assert_quantized_equal(quantize_kv(part, codec), quantize_kv_ref(part, codec), f"real KV {codec}")


@pytest.mark.parametrize("codec", QUANT_CODECS)
def test_dequantize_reads_views(codec, device):
    """A QuantizedKV read back from storage may hold views (slices of larger buffers): same values."""
    q = quantize_kv_ref(kv_like((2, 2, 70, 3, 64), torch.bfloat16).to(device), codec)
    data = torch.zeros((*q.data.shape[:2], 75, *q.data.shape[3:]), dtype=q.data.dtype, device=device)
    scales = torch.zeros((q.scales.shape[0], q.scales.shape[1] + 5), dtype=q.scales.dtype, device=device)
    data[:, :, :70] = q.data
    scales[:, 5:] = q.scales
    views = QuantizedKV(data[:, :, :70], scales[:, 5:], q.meta)
    assert not views.data.is_contiguous() and not views.scales.is_contiguous()
    assert_bytes_equal(dequantize_kv(views), dequantize_kv_ref(q), f"{codec} from views")


def test_zero_and_constant_groups(device):
    x = torch.zeros((1, 2, 40, 2, 64), dtype=torch.bfloat16, device=device)
    x[:, :, :, 1] = 3.0
    for codec in QUANT_CODECS:
        for fn in (quantize_kv, quantize_kv_ref):
            q = fn(x, codec)
            assert_bytes_equal(dequantize_kv(q), x, f"{codec} {fn.__name__}: zeros and constants")


LAYOUTS = ["flash_attn", "flash_attn_hnd", "flashinfer", "vllm_cpu", "cross_layer", "mla"]
# Addressing does not depend on the codec: every layout with int4 (the most involved), every codec on two.
LAYOUT_CODECS = [pytest.param(n, "int4", id=f"{n}-int4") for n in LAYOUTS] + [
    pytest.param(n, c, id=f"{n}-{c}") for n in ("flash_attn", "mla") for c in ("int8", "fp8")]


def _float_caches(layout, L, NB, BS, H, D, dtype, device):
    caches = make_caches(layout, L, NB, BS, H, D, dtype, device=device, fill=0)
    for view in layer_views(caches, layout):
        view.copy_(kv_like(view.shape, torch.float32))
    return caches


@pytest.mark.parametrize("name,codec", LAYOUT_CODECS)
def test_gather_kv_quantized(name, codec, device):
    """One launch reads the paged caches (any order, repeats, -1 padding) == quantize_kv(gather_kv(...))."""
    layout = KVLayout.from_name(name)
    caches = _float_caches(layout, L=2, NB=8, BS=16, H=2, D=64, dtype=torch.bfloat16, device=device)
    slots = random_slots(8 * 16, 100, pad_every=9, unique=False).to(device)  # two token tiles, one ragged
    fused = gather_kv_quantized(caches, slots, layout, codec)
    ref = gather_kv_quantized_ref(caches, slots, layout, codec)  # = quantize_kv_ref(gather_kv_ref(...))
    assert_quantized_equal(fused, ref, f"{name} {codec} fused vs reference")
    if name == "flash_attn":  # and against the two Triton launches it fuses
        assert_quantized_equal(fused, quantize_kv(gather_kv(caches, slots, layout), codec),
                               f"{name} {codec} fused vs quantize_kv(gather_kv)")
    if codec == "int8":  # padding gathers as zeros, and zeros quantize to exact zeros (symmetric)
        assert not fused.data[:, :, slots < 0].any()


@pytest.mark.parametrize("name,codec", LAYOUT_CODECS)
def test_scatter_kv_dequantized(name, codec, device):
    layout = KVLayout.from_name(name)
    L, NB, BS, H, D = 2, 8, 16, 2, 64
    slots = random_slots(NB * BS, 100, pad_every=9, unique=True).to(device)
    shape = (L, 1 if name == "mla" else 2, 100) + ((H, D) if name != "mla" else (D,))
    q = quantize_kv_ref(kv_like(shape, torch.bfloat16).to(device), codec)
    fused, ref, expected = (make_caches(layout, L, NB, BS, H, D, torch.bfloat16, device=device, fill=0xFF)
                            for _ in range(3))  # poisoned: NaN everywhere
    scatter_kv_dequantized(q, fused, slots, layout)
    scatter_kv_dequantized_ref(q, ref, slots, layout)
    scatter_kv_ref(dequantize_kv_ref(q), expected, slots, layout)
    for a, b, e in zip(layer_views(fused, layout), layer_views(ref, layout), layer_views(expected, layout)):
        assert_bytes_equal(a, e, f"{name} {codec}: fused scatter vs scatter_kv(dequantize_kv)")
        assert_bytes_equal(b, e, f"{name} {codec}: reference scatter")
    untouched = sum(int(v.isnan().sum()) for v in layer_views(fused, layout))
    assert untouched == L * (NB * BS - int((slots >= 0).sum())) * (1 if name == "mla" else 2 * H) * D


def test_meta_is_plain_and_round_trips():
    q = quantize_kv_ref(kv_like((2, 2, 70, 3, 64), torch.float16), "int4")
    d = q.meta.to_dict()
    assert json.loads(json.dumps(d)) == {**d, "shape": list(d["shape"])}
    assert QuantMeta.from_dict(json.loads(json.dumps(d))) == q.meta
    assert q.data.dtype == torch.uint8 and q.data.shape == (2, 2, 70, 3, 32)
    assert q.scale_groups(0).shape == (2, 2, 3, 64, 2) and q.scale_groups(1).shape == (2, 70, 3, 1, 2)
    assert q.scales.shape == (2, 2 * 3 * 64 * 2 + 70 * 3 * 2) and q.scales.dtype == torch.bfloat16
    back = QuantizedKV(q.data.clone(), q.scales.clone(), QuantMeta.from_dict(d))  # parts from storage
    assert_bytes_equal(dequantize_kv_ref(back), dequantize_kv_ref(q), "rebuilt from plain parts")
    with pytest.raises(ValueError, match="data"):
        QuantizedKV(q.data[:, :, :69], q.scales, q.meta)
    with pytest.raises(ValueError, match="scales"):
        QuantizedKV(q.data, q.scales.float(), q.meta)


def test_empty_staging():
    x = torch.empty((2, 2, 0, 3, 64), dtype=torch.bfloat16)
    for codec in QUANT_CODECS:
        q = quantize_kv(x, codec)
        assert dequantize_kv(q).shape == x.shape


@pytest.mark.parametrize("bad,err,match", [
    pytest.param(dict(codec="int3"), ValueError, "codec", id="codec"),
    pytest.param(dict(x=torch.zeros((2, 2, 4, 3, 64), dtype=torch.int8)), TypeError, "dtype", id="dtype"),
    pytest.param(dict(x=torch.zeros((2, 3, 4, 3, 64))), ValueError, "shape", id="kv-dim"),
    pytest.param(dict(x=torch.zeros((2, 2, 4, 3, 63)), codec="int4"), ValueError, "even", id="int4-odd-D"),
    pytest.param(dict(k_grouping="row"), ValueError, "k_grouping", id="grouping"),
])
def test_quantize_rejects_bad_arguments(bad, err, match):
    args = dict(x=torch.zeros((2, 2, 4, 3, 64)), codec="int8")
    args.update(bad)
    with pytest.raises(err, match=match):
        quantize_kv(args.pop("x"), **args)


def test_scatter_rejects_mismatched_q():
    layout = KVLayout.from_name("flash_attn")
    caches = make_caches(layout, 2, 4, 16, 3, 64, torch.bfloat16, fill=0)
    q = quantize_kv_ref(torch.zeros((2, 2, 5, 3, 64), dtype=torch.bfloat16), "int8")
    with pytest.raises(ValueError, match="need"):
        scatter_kv_dequantized(q, caches, torch.arange(6), layout)
