"""kernels.rope: RoPE re-positioning of cached K (Triton on the GPU, or under the interpreter, vs the torch
reference).

Error model used by every tolerance here. u is the dtype's unit roundoff (half an ulp, relative), rho the
norm of the (a, b) pair an element belongs to (a rotation keeps it). Rounding a pair to the dtype moves it
by at most u * rho; the float32 rotation adds at most FP32_SLACK * rho (module docstring of kernels.rope:
angle <= 5e-7 rad, cos/sin ~2 float32 ulps = 2.4e-7, two float32 roundings = 1.2e-7; total ~8e-7, doubled).
"""

import itertools

import pytest
import torch

from kernels.rope import rope_inv_freq, rope_shift, rope_shift_ref
from tests.helpers import DEVICE, assert_bytes_equal

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FP32_SLACK = 2e-6
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _pairs(x: torch.Tensor, rotary_dim: int, is_neox: bool):
    """The two members of every rotation pair of the last dim, as views."""
    f = rotary_dim // 2
    if is_neox:
        return x[..., :f], x[..., f:rotary_dim]
    return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]


def _rope_forward(x, pos, inv_freq, rotary_dim, is_neox):
    """Standard RoPE in float64 (the exact value): x [..., N, H, D], pos [N]; returns float64."""
    out = x.to(torch.float64).clone()
    angle = pos.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [N, F]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    a, b = _pairs(out, rotary_dim, is_neox)
    a0, b0 = a.clone(), b.clone()
    a.copy_(a0 * cos - b0 * sin)
    b.copy_(b0 * cos + a0 * sin)
    return out


def _pair_norm(x: torch.Tensor, rotary_dim: int, is_neox: bool) -> torch.Tensor:
    """rho for every element of the rotary channels, laid out like x[..., :rotary_dim]."""
    a, b = _pairs(x.to("cpu", torch.float64), rotary_dim, is_neox)
    rho = torch.empty(x.shape[:-1] + (rotary_dim,), dtype=torch.float64)
    ra, rb = _pairs(rho, rotary_dim, is_neox)
    ra.copy_(torch.hypot(a, b))
    rb.copy_(torch.hypot(a, b))
    return rho


def _assert_within(actual, expected, bound, what):
    actual, expected, bound = actual.cpu(), expected.cpu(), bound.cpu()
    err = (actual.to(torch.float64) - expected.to(torch.float64)).abs()
    bad = (err > bound) | err.isnan()
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements out of bound; first at {i}: "
                             f"actual {actual[i].item()} expected {expected[i].item()} bound {bound[i].item()}")


def _k_half(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0] if t.dim() == 5 else t


def _make(layout, n, d, dtype, layers=2, heads=2):
    shape = (layers, 2, n, heads, d) if layout == "staging" else (n, heads, d)
    return torch.randn(shape).to(device=DEVICE, dtype=dtype)


def _grid():
    """Every style x dtype x layout, with D, N, rotary dim and scaling cycling so each value appears."""
    params = []
    combos = itertools.product((True, False), (torch.float32, torch.bfloat16, torch.float16), ("staging", "nhd"))
    for i, (neox, dtype, layout) in enumerate(combos):
        d, n = (64, 80, 128)[i % 3], (1, 7, 130)[(i // 3 + i) % 3]
        rotary = d if i % 2 == 0 else d // 2
        scaling = (None, LLAMA3, {"rope_type": "linear", "factor": 4.0})[i % 3]
        name = "-".join([
            "neox" if neox else "gptj", DTYPE_IDS[dtype], layout, f"D{d}", f"N{n}",
            "full" if rotary == d else "partial", scaling["rope_type"] if scaling else "plain",
        ])
        params.append(pytest.param(neox, dtype, layout, d, n, rotary, scaling, id=name))
    return params


@pytest.mark.parametrize("is_neox,dtype,layout,d,n,rotary_dim,scaling", _grid())
def test_triton_matches_ref(is_neox, dtype, layout, d, n, rotary_dim, scaling):
    # Both compute the same rotation; they differ by the fp32 slack (Triton's integer-reduced angle and
    # tl.cos/tl.sin vs float64 cos/sin), which can tip a value across a rounding boundary of the dtype:
    # at most one ulp (2u |x|) plus the slack.
    k = _make(layout, n, d, dtype)
    from_pos, to_pos = torch.randint(0, 140_000, (n,)), torch.randint(0, 140_000, (n,), dtype=torch.int32)
    tri, ref = k.clone(), k.clone()
    rope_shift(tri, from_pos, to_pos, 500000.0, rotary_dim, is_neox, rope_scaling=scaling)
    rope_shift_ref(ref, from_pos, to_pos, 500000.0, rotary_dim, is_neox, rope_scaling=scaling)
    rho = _pair_norm(_k_half(k)[..., :rotary_dim], rotary_dim, is_neox)
    got, want = _k_half(tri)[..., :rotary_dim], _k_half(ref)[..., :rotary_dim]
    bound = 2 * UNIT_ROUNDOFF[dtype] * want.double().abs().cpu() + FP32_SLACK * rho  # rho: on the CPU
    _assert_within(got, want, bound, "triton vs ref")
    assert_bytes_equal(tri[..., rotary_dim:], k[..., rotary_dim:], "non-rotary channels")
    if layout == "staging":
        assert_bytes_equal(tri[:, 1], k[:, 1], "V half")


@pytest.mark.parametrize("backend", ["triton", "ref"])
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("is_neox,rotary_dim,scaling", [
    pytest.param(True, 128, None, id="neox-full"),
    pytest.param(False, 64, None, id="gptj-partial"),
    pytest.param(True, 96, LLAMA3, id="neox-partial-llama3"),
])
def test_matches_rope_at_to_pos(backend, dtype, is_neox, rotary_dim, scaling):
    # K cached at from_pos = RoPE(x, from_pos) rounded to the dtype (error <= u rho); the shift adds
    # FP32_SLACK rho and one more rounding (u rho). So vs the exact RoPE(x, to_pos): (2u + slack) rho,
    # and vs RoPE(x, to_pos) rounded to the dtype (what a fresh prefill stores): (3u + slack) rho.
    # Positions up to 140k with theta 5e5: a float32 angle delta * inv_freq would be off by up to 8e-3 rad.
    n, d, theta = 130, 128, 500000.0
    x = torch.randn(n, 4, d)
    from_pos = torch.cat([torch.tensor([0, 139_999]), torch.randint(0, 140_000, (n - 2,))])
    to_pos = torch.cat([torch.tensor([139_999, 0]), torch.randint(0, 140_000, (n - 2,))])
    inv_freq = rope_inv_freq(rotary_dim, theta, scaling)
    k = _rope_forward(x, from_pos, inv_freq, rotary_dim, is_neox).to(device=DEVICE, dtype=dtype)
    shift = rope_shift if backend == "triton" else rope_shift_ref
    shift(k, from_pos, to_pos, theta, rotary_dim, is_neox, rope_scaling=scaling)
    exact = _rope_forward(x, to_pos, inv_freq, rotary_dim, is_neox)
    rho = _pair_norm(exact[..., :rotary_dim], rotary_dim, is_neox)
    u = UNIT_ROUNDOFF[dtype]
    _assert_within(k[..., :rotary_dim], exact[..., :rotary_dim], (2 * u + FP32_SLACK) * rho, "vs exact RoPE")
    direct = exact.to(dtype)[..., :rotary_dim]
    _assert_within(k[..., :rotary_dim], direct, (3 * u + FP32_SLACK) * rho, "vs RoPE at to_pos in dtype")
    assert_bytes_equal(k[..., rotary_dim:], x[..., rotary_dim:].to(dtype), "non-rotary channels")


@pytest.mark.parametrize("shift", [rope_shift, rope_shift_ref], ids=["triton", "ref"])
def test_strided_k_outside_view_untouched(shift):
    # K [N, H, D] as every other token of a wider buffer, channel-padded: the skipped tokens and the pad
    # channels are poisoned with NaN and must come back bit for bit.
    buf = torch.full((2 * 70, 2, 160), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    buf[::2, :, :128] = torch.randn(70, 2, 128).to(device=DEVICE, dtype=torch.bfloat16)
    before = buf.clone()
    k = buf[::2, :, :128]
    shift(k, 5, 900, rotary_dim=64, is_neox=False)
    expected = before[::2, :, :128].clone()
    rope_shift_ref(expected, 5, 900, rotary_dim=64, is_neox=False)
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[::2, :, :128] = False
    assert_bytes_equal(buf[mask], before[mask], "outside the K view")
    _assert_within(k, expected, 2 * 2.0**-8 * expected.double().abs() + 1e-6, "strided K vs contiguous ref")


@pytest.mark.parametrize("shift", [rope_shift, rope_shift_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_delta_zero_is_identity(shift, is_neox):
    # delta = 0 gives angle exactly 0 (integer reduction; float64 in the ref), cos 1, sin 0: a * 1 - b * 0
    # is exactly a, so "within rounding" is zero rounding here.
    k = _make("staging", 70, 80, torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (70,))
    out = shift(k.clone(), pos, pos.clone(), 10000.0, None, is_neox)
    assert_bytes_equal(out, k, "delta = 0")


@pytest.mark.parametrize("shift", [rope_shift, rope_shift_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_round_trip(shift, dtype):
    # p -> q -> p: two shifts, each (u + slack) rho, the second rotating the first's error unchanged.
    k = _make("nhd", 70, 64, dtype)
    p, q = torch.randint(0, 100_000, (70,)), torch.randint(0, 100_000, (70,))
    out = shift(shift(k.clone(), p, q, 500000.0), q, p, 500000.0)
    rho = _pair_norm(k, 64, True)
    _assert_within(out, k, (2 * UNIT_ROUNDOFF[dtype] + 2 * FP32_SLACK) * rho, "round trip")


def test_inv_freq_argument_equals_named_params():
    k = _make("staging", 7, 128, torch.float32)
    a, b = k.clone(), k.clone()
    rope_shift(a, 3, 4000, 500000.0, rope_scaling=LLAMA3)
    rope_shift(b, 3, 4000, inv_freq=rope_inv_freq(128, 500000.0, LLAMA3))
    assert_bytes_equal(a, b, "inv_freq= vs rope_scaling=")


@pytest.mark.parametrize("call,exc,match", [
    pytest.param(lambda k: rope_shift(k, torch.zeros(6, dtype=torch.long), 0), ValueError,
                 r"from_pos: expected shape \(7,\).*got \(6,\)", id="from_pos-length"),
    pytest.param(lambda k: rope_shift(k, 0, torch.zeros(7)), TypeError, "to_pos: expected an integer dtype",
                 id="to_pos-float"),
    pytest.param(lambda k: rope_shift(k, [0] * 7, 0), TypeError, "from_pos: expected an int or an integer tensor",
                 id="from_pos-list"),
    pytest.param(lambda k: rope_shift(k.to(torch.float8_e4m3fn), 0, 1), TypeError, "float8 K must be dequantized",
                 id="float8"),
    pytest.param(lambda k: rope_shift(k.double(), 0, 1), TypeError, "k: expected dtype.*float64", id="float64"),
    pytest.param(lambda k: rope_shift(k[None], 0, 1), ValueError, r"k: expected a staging tensor.*\(1, 7, 2, 64\)",
                 id="4d"),
    pytest.param(lambda k: rope_shift(k, 0, 1, rotary_dim=33), ValueError, "rotary_dim: expected an even int",
                 id="rotary-odd"),
    pytest.param(lambda k: rope_shift(k, 0, 1, rotary_dim=128), ValueError, r"rotary_dim.*\[2, D=64\].*128",
                 id="rotary-too-big"),
    pytest.param(lambda k: rope_shift(k, 0, 1, rope_scaling={"rope_type": "yarn", "factor": 4.0}), ValueError,
                 "rope_type 'yarn' is not supported", id="yarn"),
    pytest.param(lambda k: rope_shift(k, 0, 1, rope_scaling={"rope_type": "llama3", "factor": 8.0}), ValueError,
                 "missing.*low_freq_factor", id="llama3-missing-key"),
    pytest.param(lambda k: rope_shift(k, 0, 1, inv_freq=torch.ones(16)), ValueError,
                 "inv_freq: expected 32 finite frequencies.*got 16", id="inv_freq-length"),
    pytest.param(lambda k: rope_shift(k, 0, 1, rope_theta=0.0), ValueError, "rope_theta: expected a finite number",
                 id="rope_theta-zero"),
    pytest.param(lambda k: rope_shift(k, 0, 1, rope_scaling={**LLAMA3, "high_freq_factor": 1.0}), ValueError,
                 "high_freq_factor > low_freq_factor", id="llama3-degenerate"),
    pytest.param(lambda k: rope_shift(k, 0, 1, inv_freq=torch.ones(32), rope_scaling=LLAMA3), ValueError,
                 "inv_freq and rope_scaling were both given", id="inv_freq-and-scaling"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(7, 2, 64))


@pytest.mark.parametrize("rope_type", ["default", "llama3"])
def test_conventions_match_transformers(rope_type):
    """Our inv_freq and neox forward RoPE against transformers' Llama, and a shift of HF-rotated keys."""
    pytest.importorskip("transformers", reason="transformers is the reference RoPE implementation here")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = {"rope_type": rope_type, "rope_theta": 500000.0, **({k: v for k, v in LLAMA3.items() if k != "rope_type"}
                                                                 if rope_type == "llama3" else {})}
    shape = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, head_dim=128,
                 max_position_embeddings=131072)
    if hasattr(LlamaConfig(), "rope_parameters"):  # transformers >= 5
        config = LlamaConfig(**shape, rope_parameters=params)
    else:  # transformers 4.x: rope_theta and a rope_scaling dict
        config = LlamaConfig(**shape, rope_theta=500000.0, rope_scaling=params if rope_type != "default" else None)
    emb = LlamaRotaryEmbedding(config)
    ours = rope_inv_freq(128, 500000.0, params)
    # Both compute in float32 from the same formula; allow one float32 ulp for a different operation order.
    _assert_within(ours, emb.inv_freq, 2.0**-23 * emb.inv_freq.double().abs(), "inv_freq vs transformers")

    n = 64
    x = torch.randn(1, 2, n, 128)  # HF layout [batch, heads, seq, D]
    p, q = torch.randint(0, 2048, (n,)), torch.randint(0, 2048, (n,))

    def hf_rope(pos):
        cos, sin = emb(x, pos[None])
        return apply_rotary_pos_emb(x, x, cos, sin)[1][0].transpose(0, 1)  # [N, H, D]

    # HF rounds the angle pos * inv_freq in float32: <= 2048 * 2**-24 = 1.2e-4 rad at pos < 2048, so
    # agreement to 2e-4 rho (4e-4 rho after two HF roundings) pins the pairs, signs and frequencies.
    mine = _rope_forward(x[0].transpose(0, 1), p, ours, 128, True)
    rho = _pair_norm(mine, 128, True)
    _assert_within(hf_rope(p), mine, 2e-4 * rho, "neox forward RoPE vs transformers")
    shifted = rope_shift(hf_rope(p).to(DEVICE), p, q, 500000.0, rope_scaling=params)
    _assert_within(shifted, hf_rope(q), 4e-4 * rho, "rope_shift of HF keys vs HF keys at to_pos")
