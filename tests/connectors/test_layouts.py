"""Layout detection: (attention backend, cache shape, vLLM layout) -> our layout, checked by moving real bytes.

Each case builds the cache tensors the way vLLM 0.32 (or, for the legacy cases, older vLLM) allocates them,
detects the layout, and checks that gather_kv through the detected view reads exactly the K and V the
backend's own attention code would read for those slots (`split(head_size)` of the packed content dim,
the CPU backend's K-tile-then-V-tile view, ...), and that scatter_kv writes only the slots it is given.
Cases vLLM cannot produce on this CPU machine (GPU backends) are built by hand: there is no GPU here.
"""

import pytest
import torch

from connectors.vllm_layouts import detect_layout
from kernels import KVLayoutError, gather_kv, scatter_kv
from tests.helpers import assert_bytes_equal

NB, BS, H, D, L = 6, 16, 3, 8, 2


def _physical(order: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One buffer for L layers in a vLLM 0.32 KVCacheLayout (e.g. "LBNHC"), viewed per layer as the logical
    (B, H, N, C=2D), the way create_kv_cache_views does it."""
    sizes = {"L": L, "B": NB, "H": H, "N": BS, "C": 2 * D}
    raw = torch.randn([sizes[c] for c in order])
    logical = raw.permute([order.index(c) for c in "LBHNC"])
    return raw, list(logical.unbind(0))


def _packed_kv(layer: torch.Tensor):
    """FlashAttention / FlashInfer / Triton: (B, H, N, 2D) -> K, V as (B, N, H, D) (their forward code)."""
    return layer.transpose(1, 2).split(D, dim=-1)


def _cases():
    cases = []
    for order, name in (("LBNHC", "NB BS H 2 D"), ("LBHNC", "NB H BS 2 D"), ("BLNHC", "NB BS H 2 D"),
                        ("BLHNC", "NB H BS 2 D"), ("LHBNC", "H NB BS 2 D")):
        for backend in ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"):
            cases.append(pytest.param(backend, order, name, _packed_kv, id=f"{backend}-{order}"))
    return cases


@pytest.mark.parametrize("backend,order,expected,semantics", _cases())
def test_vllm_032_layouts_read_what_attention_reads(backend, order, expected, semantics):
    _raw, layers = _physical(order)
    detected = detect_layout(backend, tuple(layers[0].shape), order)
    assert detected.name == expected
    views = [detected.view(t) for t in layers]
    slots = torch.tensor([5, 0, NB * BS - 1, 17, 40, 33], dtype=torch.int64)
    staging = gather_kv(views, slots, detected.kv_layout)
    for layer_idx, layer in enumerate(layers):
        k, v = semantics(layer)
        for n, slot in enumerate(slots.tolist()):
            b, off = divmod(slot, BS)
            assert_bytes_equal(staging[layer_idx, 0, n], k[b, off], f"K layer {layer_idx} slot {slot}")
            assert_bytes_equal(staging[layer_idx, 1, n], v[b, off], f"V layer {layer_idx} slot {slot}")
    # scatter back into a poisoned copy: exactly the given slots change, to exactly the gathered bytes
    raw2, layers2 = _physical(order)
    before = raw2.clone()
    scatter_kv(staging, [detected.view(t) for t in layers2], slots, detected.kv_layout)
    assert_bytes_equal(gather_kv([detected.view(t) for t in layers2], slots, detected.kv_layout), staging)
    changed = (raw2 != before)
    assert changed.sum() == staging.numel(), "scatter touched slots outside the mapping"


def test_cpu_whole_blocks_round_trip_through_vllms_own_kernel():
    """CPU_ATTN: vLLM's C++ kernel writes tokens into blocks in its ISA's private order; moving whole blocks
    through the detected layout reproduces them byte for byte, moving part of a block does not (which is
    why loads of this layout end on block boundaries)."""
    import vllm._custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    bs, d = 32, 32  # the CPU kernels need block sizes and head dims that are multiples of 32
    isa = _get_attn_isa(torch.float32, bs, d)
    detected = detect_layout("CPU_ATTN", (NB, H, bs, 2 * d), "LBHNC")
    assert detected.name == "vllm_cpu" and detected.whole_blocks
    src = [torch.zeros(NB, H, bs, 2 * d) for _ in range(L)]
    slots = torch.arange(bs, 3 * bs)  # blocks 1 and 2, whole
    for layer in src:
        k_cache, v_cache = layer.view(NB, H, 2 * bs, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(torch.randn(len(slots), H, d), torch.randn(len(slots), H, d),
                                       k_cache, v_cache, slots, isa)
    staging = gather_kv([detected.view(t) for t in src], slots, detected.kv_layout)
    dst = [torch.zeros_like(t) for t in src]
    scatter_kv(staging, [detected.view(t) for t in dst], slots, detected.kv_layout)
    for a, b in zip(src, dst):
        assert_bytes_equal(b, a, "whole blocks through vllm_cpu")
    half = torch.arange(bs, bs + bs // 2)  # half of block 1: not the bytes of those tokens under every ISA
    part = [torch.zeros_like(t) for t in src]
    scatter_kv(gather_kv([detected.view(t) for t in src], half, detected.kv_layout),
               [detected.view(t) for t in part], half, detected.kv_layout)
    if isa == "vec":  # K stored transposed: the first half of the token rows is not the first half of tokens
        assert not torch.equal(part[0][1, :, : bs // 2], src[0][1, :, : bs // 2])


def test_mla_032():
    raw = torch.randn(L, NB, 1, BS, D)  # (B, 1, N, latent) per layer
    layers = list(raw.unbind(0))
    detected = detect_layout("FLASHMLA", tuple(layers[0].shape), "LBNHC")
    assert detected.name == "mla"
    slots = torch.tensor([3, 50, 17])
    staging = gather_kv([detected.view(t) for t in layers], slots, detected.kv_layout)
    assert staging.shape == (L, 1, 3, D)
    for n, slot in enumerate(slots.tolist()):
        assert_bytes_equal(staging[:, 0, n], raw[:, slot // BS, 0, slot % BS], f"latent slot {slot}")


def _legacy(backend, physical_shape, permute, vllm_layout, expected, read):
    """Older vLLM: a tensor allocated physically, then permuted to the logical shape it reports."""
    layers = [torch.randn(physical_shape).permute(permute) if permute else torch.randn(physical_shape)
              for _ in range(L)]
    return pytest.param(backend, layers, vllm_layout, expected, read, id=f"legacy-{expected}")


@pytest.mark.parametrize("backend,layers,vllm_layout,expected,read", [
    _legacy("FLASH_ATTN", (2, NB, BS, H, D), None, "NHD", "flash_attn", lambda t, b, o: (t[0, b, o], t[1, b, o])),
    _legacy("FLASH_ATTN", (2, NB, H, BS, D), (0, 1, 3, 2, 4), "HND", "flash_attn_hnd",
            lambda t, b, o: (t[0, b, o], t[1, b, o])),
    _legacy("FLASHINFER", (NB, 2, BS, H, D), None, "NHD", "flashinfer", lambda t, b, o: (t[b, 0, o], t[b, 1, o])),
    _legacy("FLASHINFER", (NB, 2, H, BS, D), (0, 1, 3, 2, 4), "HND", "NB 2 H BS D",
            lambda t, b, o: (t[b, 0, o], t[b, 1, o])),
])
def test_legacy_layouts(backend, layers, vllm_layout, expected, read):
    detected = detect_layout(backend, tuple(layers[0].shape), vllm_layout)
    assert detected.name == expected
    slots = torch.tensor([0, 7, NB * BS - 1, 30])
    staging = gather_kv([detected.view(t) for t in layers], slots, detected.kv_layout)
    for li, t in enumerate(layers):
        for n, slot in enumerate(slots.tolist()):
            k, v = read(t, *divmod(slot, BS))
            assert_bytes_equal(staging[li, 0, n], k, f"K {expected} layer {li} slot {slot}")
            assert_bytes_equal(staging[li, 1, n], v, f"V {expected} layer {li} slot {slot}")


def test_legacy_cross_layer_and_mla():
    whole = torch.randn(NB, L, 2, BS, H, D)
    detected = detect_layout("FLASH_ATTN", tuple(whole.shape), "NHD")
    assert detected.name == "cross_layer"
    slots = torch.tensor([9, 2])
    staging = gather_kv(detected.view(whole), slots, detected.kv_layout)
    for n, slot in enumerate(slots.tolist()):
        assert_bytes_equal(staging[:, :, n], whole[slot // BS, :, :, slot % BS], f"cross-layer slot {slot}")
    latent = [torch.randn(NB, BS, D) for _ in range(L)]
    detected = detect_layout("TRITON_MLA", (NB, BS, D), None)
    assert detected.name == "mla"
    staging = gather_kv(latent, slots, detected.kv_layout)
    assert_bytes_equal(staging[1, 0, 0], latent[1][0, 9])


@pytest.mark.parametrize("backend,shape,vllm_layout,why", [
    ("TURBOQUANT", (NB, H, BS, 2 * D), "LBNHC", "not supported"),
    ("FLASH_ATTN_DIFFKV", (NB, H, BS, 3 * D), "LBNHC", "not supported"),
    ("CPU_ATTN", (NB, H, BS, 2 * D), "LBNHC", "head-major"),
    ("FLASHMLA", (NB, 2, BS, D), "LBNHC", "one latent head"),
    ("FLASH_ATTN", (NB, H, BS, 2 * D + 1), "LBNHC", "even"),
    ("FLASH_ATTN", (NB, H, BS, 2 * D), "XYZ", "KVCacheLayout"),
    ("FLASH_ATTN", (3, NB, BS, H, D), "NHD", "refuses to guess"),
    ("ROCM_ATTN", (2, NB, BS, H, D), "NHD", "refuses to guess"),
])
def test_unknown_layouts_are_refused(backend, shape, vllm_layout, why):
    with pytest.raises(KVLayoutError, match=why):
        detect_layout(backend, shape, vllm_layout)
