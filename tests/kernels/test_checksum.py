"""kv_checksum: Triton == torch reference == an independent pure-Python oracle of the documented definition,
over dtypes and odd sizes; single-bit flips, swaps and padding always change it; tiling does not."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.checksum as ck
from kernels._env import use_triton
from kernels.checksum import kv_checksum, kv_checksum_ref
from tests.helpers import DEVICE

M64 = (1 << 64) - 1


def _fmix64(x):
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    return x ^ (x >> 33)


def _oracle(data: bytes) -> int:
    """The module docstring's definition, from scratch (slow: small inputs only)."""
    n = len(data)
    words = np.frombuffer(data + bytes(-n % 4), dtype="<u4").tolist()
    s = sum(_fmix64(((i & 0xFFFFFFFF) << 32) | w) for i, w in enumerate(words)) & M64
    return _fmix64((s + n * 0x9E3779B97F4A7C15) & M64)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def _make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


CASES = [
    pytest.param((4, 2, 16, 2, 64), torch.bfloat16, id="bf16-staging"),
    pytest.param((3, 2, 5, 3, 7), torch.float16, id="fp16-odd"),
    pytest.param((2, 2, 33, 1, 17), torch.float32, id="fp32-odd"),
    pytest.param((2, 2, 9, 2, 13), torch.float8_e4m3fn, id="fp8-odd-bytes"),
    pytest.param((4099,), torch.int8, id="int8-tail3"),
    pytest.param((1,), torch.uint8, id="uint8-1byte"),
    pytest.param((6,), torch.uint8, id="uint8-tail2"),
    pytest.param((3 * 8192 + 5,), torch.int32, id="int32-4-programs"),
    pytest.param((9, 7), torch.int64, id="int64"),
    pytest.param((0, 4), torch.bfloat16, id="empty"),
    pytest.param((), torch.float32, id="scalar"),
    pytest.param((31,), torch.bool, id="bool"),
]


@pytest.mark.parametrize("shape,dtype", CASES)
def test_triton_matches_ref_and_oracle(shape, dtype):
    t = _make(shape, dtype).to(DEVICE)
    if not use_triton(t):
        pytest.skip("use_triton() is False (no CUDA nor TRITON_INTERPRET=1, or LMCACHE_KERNEL_BACKEND=torch)")
    got, ref = kv_checksum(t), kv_checksum_ref(t)
    assert isinstance(got, int) and 0 <= got <= M64
    assert got == ref, f"triton {got:#x} != ref {ref:#x}"
    if t.numel() * t.element_size() <= 64 * 1024:
        assert ref == _oracle(_bytes(t))


def test_golden_value():
    # computed once with _oracle; a change here is a format break
    assert _oracle(bytes(range(10))) == 0x1E141BD5C9573AA4
    assert kv_checksum(torch.arange(10, dtype=torch.uint8)) == 0x1E141BD5C9573AA4


def test_ref_slabs_match_oracle(monkeypatch):
    monkeypatch.setattr(ck, "_REF_SLAB_WORDS", 64)  # many slabs, a ragged last one
    t = _make((1001,), torch.int16)
    assert kv_checksum_ref(t) == _oracle(_bytes(t))


def test_independent_of_tiling(monkeypatch):
    t = _make((2, 2, 64, 2, 128), torch.bfloat16).to(DEVICE)
    want = kv_checksum(t)
    monkeypatch.setattr(ck, "BLOCK_WORDS", 1024)
    assert kv_checksum(t) == want


def test_non_contiguous_equals_contiguous_copy():
    t = _make((2, 2, 16, 4, 32), torch.bfloat16).to(DEVICE)
    view = t.transpose(2, 3)
    assert not view.is_contiguous()
    assert kv_checksum(view) == kv_checksum_ref(view) == kv_checksum(view.contiguous())


def test_unaligned_byte_offset():
    buf = _make((4 * 1000 + 3,), torch.uint8).to(DEVICE)
    view = buf[1:]  # starts 1 byte into the storage: cannot be read as int32 in place
    assert kv_checksum(view) == kv_checksum_ref(view) == _oracle(_bytes(view))


def test_zero_padding_is_not_ambiguous():
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    b = torch.tensor([1, 2, 3, 0], dtype=torch.uint8)
    assert kv_checksum(a) != kv_checksum(b)
    assert kv_checksum(torch.zeros(0, dtype=torch.uint8)) != kv_checksum(torch.zeros(4, dtype=torch.uint8))


_FLIP_BASE = _make((2, 2, 8, 1, 33), torch.bfloat16, seed=7)  # 2112 bytes


def _flipped(t: torch.Tensor, bit: int) -> torch.Tensor:
    raw = t.clone().reshape(-1).view(torch.uint8)
    raw[bit // 8] ^= 1 << (bit % 8)
    return raw.view(t.dtype).reshape(t.shape)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bit=st.integers(0, _FLIP_BASE.numel() * 16 - 1))
def test_single_bit_flip_changes_checksum(bit):
    base = kv_checksum_ref(_FLIP_BASE)
    flipped = _flipped(_FLIP_BASE, bit)
    assert kv_checksum_ref(flipped) != base
    assert kv_checksum(flipped.to(DEVICE)) == kv_checksum_ref(flipped)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bit=st.integers(0, 4099 * 8 - 1))
def test_single_bit_flip_with_tail_bytes(bit):
    t = _make((4099,), torch.int8, seed=3)
    assert kv_checksum(_flipped(t, bit)) != kv_checksum(t)


def test_swaps_change_checksum():
    t = _make((4, 2, 32, 2, 16), torch.bfloat16)  # [L, 2, N, H, D]
    base = kv_checksum(t)
    swapped_tokens = t.clone()
    swapped_tokens[:, :, [3, 20]] = t[:, :, [20, 3]]
    swapped_kv = t.flip(1).contiguous()
    swapped_layers = t[[1, 0, 2, 3]].contiguous()
    chunks = t.reshape(-1).view(torch.uint8)
    half = chunks.numel() // 2
    swapped_halves = torch.cat([chunks[half:], chunks[:half]]).view(torch.bfloat16).reshape(t.shape)
    for name, s in [("tokens", swapped_tokens), ("k/v", swapped_kv), ("layers", swapped_layers),
                    ("halves", swapped_halves)]:
        assert kv_checksum(s) != base, name
    a = torch.tensor([1, 2], dtype=torch.int32)  # two words, swapped
    assert kv_checksum(a) != kv_checksum(a.flip(0))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match=r"staging: expected a torch.Tensor, got bytes"):
        kv_checksum(b"abc")
