"""Per-token access to vLLM CPU_ATTN blocks (connectors.cpu_blocks), checked against vLLM's own C++ ops.

The reference everywhere is `torch.ops._C.cpu_attn_reshape_and_cache`, called the way cpu_attn.py calls it
(`_vllm_write` below repeats those lines rather than using the module's wrapper), for the ISA cpu_attn.py's
`_get_attn_isa` picks on this machine ("vec" for block sizes that are multiples of 32 and head dims that
are multiples of 32, "vec16" otherwise, here: no AMX, x86). The other ISA that this build runs ("vec16" at
block size 128) is probed too; "amx", "neon", "rvv", "vxe", "vsx" are refused by this machine's build, which
is checked, and the probe's generality is checked with fake ops that store blocks in other orders.
"""

import pytest
import torch

from connectors import cpu_block_probe as probe
from connectors import cpu_blocks as cb
from connectors.cpu_block_probe import BlockLayout, BlockLayoutError, probe_block_layout
from connectors.cpu_blocks import gather_tokens, scatter_tokens
from tests.helpers import assert_bytes_equal, assert_close

ops = pytest.importorskip("vllm._custom_ops")  # installed here: these tests run
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

NB, L = 5, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are small, and on a shared 2-core machine two OpenMP threads
    contending with other processes make every op 10-100x slower (measured: a probe 1.7 s vs 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vllm_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, isa: str):
    """cpu_attn.py `do_kv_cache_update`, verbatim in substance."""
    num_blocks, num_kv_heads, block_size, _ = cache.size()
    key_cache, value_cache = cache.view((num_blocks, num_kv_heads, block_size * 2, -1)).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def _configs():
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for bs in (128, 32, 16):
            for h in (1, 3):
                for d in (64, 128):
                    out.append(pytest.param(dtype, bs, h, d, id=f"{str(dtype)[6:]}-bs{bs}-h{h}-d{d}"))
    # vec16 at a vLLM block size (head dim 80 is not a multiple of 32), and float16
    out.append(pytest.param(torch.bfloat16, 128, 2, 80, id="bfloat16-bs128-h2-d80"))
    out.append(pytest.param(torch.float16, 32, 3, 64, id="float16-bs32-h3-d64"))
    return out


CONFIGS = _configs()


def _isa(dtype, bs, d):
    return cpu_attn._get_attn_isa(dtype, bs, d)


def _layers(dtype, bs, h, d, seed=0):
    """L per-layer caches the way vLLM 0.32 hands them over for LBHNC: views of one buffer with storage
    offsets, filled with random values (so untouched elements are compared too)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(L, NB, h, bs, 2 * d, generator=g).to(dtype)
    return raw, list(raw.unbind(0))


def _random_slots(n, bs, seed=1):
    """n distinct slots in random order: partial blocks, unsorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(NB * bs, generator=g)[:n]


def _random_kv(n, h, d, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, n, h, d, generator=g).to(dtype)


# -- the probe -----------------------------------------------------------------------------------------------

def test_isa_selected_here():
    """What this machine runs (x86 with AVX-512, no AMX): "vec", or "vec16" for 16-token blocks/odd dims."""
    for dtype in (torch.bfloat16, torch.float32):
        assert probe.attn_isa(dtype, 128, 64) == _isa(dtype, 128, 64)
        if not torch.cpu._is_amx_tile_supported() and cpu_attn.current_platform.get_cpu_architecture().name == "X86":
            assert _isa(dtype, 128, 128) == "vec"
            assert _isa(dtype, 16, 128) == "vec16"
            assert _isa(dtype, 128, 80) == "vec16"


@pytest.mark.parametrize("dtype,bs,h,d", CONFIGS)
def test_probe_is_a_cached_bijection(dtype, bs, h, d):
    layout = probe_block_layout(_isa(dtype, bs, d), dtype, bs, h, d)
    assert probe_block_layout(_isa(dtype, bs, d), dtype, bs, h, d) is layout  # lru_cache
    n = 2 * bs * h * d
    assert layout.canon_to_phys.dtype == layout.phys_to_canon.dtype == torch.int64
    assert torch.equal(layout.canon_to_phys[layout.phys_to_canon], torch.arange(n))
    assert torch.equal(layout.phys_to_canon[layout.canon_to_phys], torch.arange(n))
    assert torch.equal(layout.canon_to_phys.sort().values, torch.arange(n))


@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_vec_layouts_are_what_the_cpp_source_documents(isa, dtype):
    """cpu_attn_vec.hpp / cpu_attn_vec16.hpp: per (block, head) tile, K "[head_dim, block_size], row-major"
    then V "[block_size, head_dim], row-major". The probe finds exactly that (it was not told)."""
    bs, h, d = 32, 3, 64
    layout = probe_block_layout(isa, dtype, bs, h, d)
    kv, n, hh, dd = torch.meshgrid(torch.arange(2), torch.arange(bs), torch.arange(h), torch.arange(d),
                                   indexing="ij")
    tile = bs * 2 * d
    expected = torch.where(kv == 0, hh * tile + dd * bs + n, hh * tile + bs * d + n * d + dd)
    assert torch.equal(layout.canon_to_phys, expected.reshape(-1))
    assert not layout.matches_python_view
    text = layout.describe()
    assert "K: [D, BS] (transposed, dim-major) at offset 0" in text
    assert f"V: [BS, D] (token-major) at offset {bs * d}" in text


@pytest.mark.parametrize("isa", ["amx", "neon", "rvv", "vxe", "vsx"])
def test_isas_this_build_refuses_raise_a_clear_error(isa):
    try:
        layout = probe_block_layout(isa, torch.bfloat16, 32, 2, 64)
    except BlockLayoutError as e:
        assert "refused the configuration" in str(e) and repr(isa) in str(e)
    else:  # a build/CPU that has it: then it must be a proven bijection like any other
        assert torch.equal(layout.canon_to_phys.sort().values, torch.arange(2 * 32 * 2 * 64))


def test_probe_argument_errors():
    with pytest.raises(ValueError, match="dtype"):
        probe_block_layout("vec", torch.int8, 32, 1, 64)
    with pytest.raises(ValueError, match="dtype.*fp8"):
        probe_block_layout("vec", torch.float8_e4m3fn, 32, 1, 64)
    with pytest.raises(ValueError, match="block_size"):
        probe_block_layout("vec", torch.float32, 0, 1, 64)
    with pytest.raises(ValueError, match="num_heads"):
        probe_block_layout("vec", torch.float32, 32, 1.5, 64)
    with pytest.raises(ValueError, match="isa"):
        probe_block_layout("", torch.float32, 32, 1, 64)
    with pytest.raises(BlockLayoutError, match="Invalid ISA"):
        probe_block_layout("bogus", torch.float32, 32, 1, 64)


# fake ops: the probe knows nothing about "vec"; other orders (an AMX-like VNNI packing) are found and
# proven the same way, and ops that do not store tokens as a per-token bijection are refused.

def _fake_from_map(phys_of):
    """A write op that stores canonical element (kv, n, h, d) of a block at phys_of(kv, n, h, d)."""
    def write(cache, key, value, slots, isa):
        nb, h, bs, c2 = cache.shape
        d = c2 // 2
        flat = cache.view(nb, -1)
        for i, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            b, n = divmod(slot, bs)
            hh, dd = torch.meshgrid(torch.arange(h), torch.arange(d), indexing="ij")
            flat[b, phys_of(0, n, hh, dd, bs, d)] = key[i]
            flat[b, phys_of(1, n, hh, dd, bs, d)] = value[i]
    return write


def _vnni_pairs(kv, n, h, d, bs, dim):
    """AMX-like: K as [D/2, BS, 2] (pairs of dims per token), V as [BS/2, D, 2] (pairs of tokens per dim)."""
    tile = bs * 2 * dim
    if kv == 0:
        return h * tile + (d // 2) * (bs * 2) + n * 2 + d % 2
    return h * tile + bs * dim + (n // 2) * (dim * 2) + d * 2 + n % 2


def test_probe_finds_a_packed_layout_and_gather_scatter_follow_it():
    bs, h, d, dtype = 16, 2, 8, torch.bfloat16
    write = _fake_from_map(_vnni_pairs)
    layout = probe._probe("fake-amx", dtype, bs, h, d, write=write)
    assert "packed" in layout.describe()
    raw, caches = _layers(dtype, bs, h, d)
    slots = _random_slots(23, bs)
    kv = _random_kv(23, h, d, dtype)
    ref = raw.clone()
    for li, cache in enumerate(ref.unbind(0)):
        write(cache, kv[li, 0], kv[li, 1], slots, "fake-amx")
    scatter_tokens(kv, caches, slots, layout)
    assert_bytes_equal(raw, ref, "scatter through a VNNI-like layout")
    assert_bytes_equal(gather_tokens(caches, slots, layout), kv, "gather through a VNNI-like layout")


def test_probe_of_a_python_view_layout():
    write = _fake_from_map(lambda kv, n, h, d, bs, dim: h * bs * 2 * dim + kv * bs * dim + n * dim + d)
    layout = probe._probe("fake-view", torch.float32, 16, 3, 8, write=write)
    assert layout.matches_python_view
    assert "K: [BS, D] (token-major) at offset 0" in layout.describe()


def _real_then(post):
    """vLLM's op, then `post(cache, slots)` tampers with the result."""
    def write(cache, key, value, slots, isa):
        _vllm_write(cache, key, value, slots, "vec")
        post(cache, slots)
    return write


def _written_blocks(cache, slots):
    return sorted({s // cache.shape[2] for s in slots.tolist()})


def _drop_an_element(cache, slots):
    cache[0].view(-1)[5] = -1


def _duplicate_an_element(cache, slots):
    for b in _written_blocks(cache, slots):
        cache[b].view(-1)[1] = cache[b].view(-1)[0]


def _shift_values(cache, slots):
    for b in _written_blocks(cache, slots):
        cache[b].add_(0.5)


def _write_outside(cache, slots):
    cache[1].view(-1)[0] = 7


def _depend_on_block(cache, slots):
    if 2 in _written_blocks(cache, slots):
        cache[2].copy_(cache[2].reshape(-1).roll(1).view_as(cache[2]))


def _clobber_pair_partner(cache, slots):
    """Like a kernel packing token pairs that rewrites the partner of each written token (with zeros)."""
    bs = cache.shape[2]
    written = set(slots.tolist())
    for s in written:
        partner = s ^ 1
        if partner not in written:
            b, n = divmod(partner, bs)
            cache[b, :, n] = 0  # the partner's row in the Python view: K dims of several tokens, V of one


@pytest.mark.parametrize("tamper,message", [
    (_drop_an_element, "unwritten"),
    (_duplicate_an_element, "not a bijection"),
    (_shift_values, "changed values"),
    (_write_outside, "block 1"),
    (_depend_on_block, "different places"),
    (_clobber_pair_partner, "odd tokens"),
], ids=lambda x: getattr(x, "__name__", "")[1:])
def test_probe_refuses_ops_that_are_not_per_token_bijections(tamper, message):
    with pytest.raises(BlockLayoutError, match=message):
        probe._probe("vec", torch.float32, 32, 2, 32, write=_real_then(tamper))


# -- gather / scatter against vLLM's op -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype,bs,h,d", CONFIGS)
def test_gather_reads_exactly_what_vllm_wrote(dtype, bs, h, d):
    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    _raw, caches = _layers(dtype, bs, h, d)
    n = bs + bs // 2 + 3  # more than a block, in random slots of every block
    slots, kv = _random_slots(n, bs), _random_kv(n, h, d, dtype)
    for li, cache in enumerate(caches):
        _vllm_write(cache, kv[li, 0], kv[li, 1], slots, isa)
    assert_bytes_equal(gather_tokens(caches, slots, layout), kv, f"gather {isa}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))  # any order, and repeats
    again = torch.cat([slots[perm], slots[:4]])
    assert_bytes_equal(gather_tokens(caches, again, layout), torch.cat([kv[:, :, perm], kv[:, :, :4]], 2),
                       "gather permuted, with repeats")


@pytest.mark.parametrize("dtype,bs,h,d", CONFIGS)
def test_scatter_writes_the_bytes_vllm_writes(dtype, bs, h, d):
    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    raw, caches = _layers(dtype, bs, h, d)
    ref = raw.clone()
    n = 2 * bs + 5
    slots, kv = _random_slots(n, bs, seed=4), _random_kv(n, h, d, dtype, seed=5)
    for li, cache in enumerate(ref.unbind(0)):
        _vllm_write(cache, kv[li, 0], kv[li, 1], slots, isa)
    scatter_tokens(kv, caches, slots, layout)
    assert_bytes_equal(raw, ref, f"scatter {isa} vs cpu_attn_reshape_and_cache (whole buffer)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("order,padded", [("LBHNC", False), ("LBHNC", True), ("BLHNC", False), ("BLHNC", True),
                                          ("BHLNC", False)])
def test_layer_views_as_vllm_builds_them(dtype, order, padded):
    """The per-layer tensors vLLM 0.32 hands over come from `create_kv_cache_views` (as_strided on one int8
    buffer): LBHNC (what CPU_ATTN asks for) gives dense layers at storage offsets, a padded page gives block
    strides larger than a block, block-outermost layouts interleave layers (BLHNC) or even put heads outside
    layers (BHLNC: head stride != tile). Built here with vLLM's own function; the op takes block and head
    strides from the tensor, and scatter/gather agree with it byte for byte over the whole buffer."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheTensor,
        create_kv_cache_views,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout

    bs, h, d, layers = 32, 3, 64, 3
    dense = 2 * bs * h * d * dtype.itemsize
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d, dtype=dtype,
                             page_size_padded=dense + 256 if padded else None)
    page, names = spec.page_size_bytes, [f"layer.{i}" for i in range(layers)]
    strides = {"LBHNC": (page * NB, page), "BLHNC": (page, page * layers), "BHLNC": (page // h, page * layers)}
    layer_stride, block_stride = strides[order]
    tensor = KVCacheTensor(size=page * NB * layers, layers=names, layer_stride=layer_stride,
                           block_stride=block_stride)
    raw = torch.randint(-128, 128, (tensor.size,), dtype=torch.int8, generator=torch.Generator().manual_seed(11))
    ref = raw.clone()
    caches = create_kv_cache_views(raw, spec, NB, KVCacheLayout[order], tensor)
    ref_caches = create_kv_cache_views(ref, spec, NB, KVCacheLayout[order], tensor)
    assert caches[0].shape == (NB, h, bs, 2 * d) and caches[0].dtype == dtype
    assert padded == (caches[0].stride(0) != h * bs * 2 * d) or order != "LBHNC"
    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    n = bs + 9
    slots = _random_slots(n, bs, seed=12)
    kv = torch.randn(layers, 2, n, h, d, generator=torch.Generator().manual_seed(13)).to(dtype)
    for li, cache in enumerate(ref_caches):
        _vllm_write(cache, kv[li, 0], kv[li, 1], slots, isa)
    scatter_tokens(kv, caches, slots, layout)
    assert_bytes_equal(raw, ref, f"{order} padded={padded}: scatter vs the op over the whole buffer")
    assert_bytes_equal(gather_tokens(ref_caches, slots, layout), kv, f"{order}: gather of what the op wrote")


@pytest.mark.parametrize("dtype,bs,h,d", CONFIGS[::3])
def test_whole_blocks_agree_with_the_whole_block_path(dtype, bs, h, d):
    """The current path (connectors.vllm_layouts `vllm_cpu`, whole blocks through the kernels' gather_kv) and
    per-token access round-trip whole blocks to the same bytes; the two stagings differ exactly by the
    probed permutation (the whole-block path stages the block in the Python view's order)."""
    from connectors.vllm_layouts import detect_layout
    from kernels import gather_kv, scatter_kv

    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    detected = detect_layout("CPU_ATTN", (NB, h, bs, 2 * d), "LBHNC")
    assert detected.whole_blocks
    raw, caches = _layers(dtype, bs, h, d)
    blocks = [3, 1]
    slots = torch.cat([torch.arange(b * bs, (b + 1) * bs) for b in blocks])
    old = gather_kv([detected.view(t) for t in caches], slots, detected.kv_layout)
    new = gather_tokens(caches, slots, layout)
    for li in range(L):  # old[l, kv, n, h, d] is the block's element h*tile + kv*bs*d + (n % bs)*d + d
        for j, b in enumerate(blocks):
            phys = old[li, :, j * bs:(j + 1) * bs].permute(2, 0, 1, 3).reshape(-1)
            assert_bytes_equal(new[li, :, j * bs:(j + 1) * bs].reshape(-1), phys[layout.canon_to_phys],
                               f"layer {li} block {b}: canonical = physical through the map")
    dst_old, old_caches = _layers(dtype, bs, h, d, seed=9)
    dst_new, new_caches = _layers(dtype, bs, h, d, seed=9)
    scatter_kv(old, [detected.view(t) for t in old_caches], slots, detected.kv_layout)
    scatter_tokens(new, new_caches, slots, layout)
    assert_bytes_equal(dst_new, dst_old, "whole blocks: per-token round trip vs the whole-block path")
    for b in blocks:
        assert_bytes_equal(dst_new[:, b], raw[:, b], f"block {b} copied exactly")


@pytest.mark.parametrize("dtype,bs,h,d", [CONFIGS[1], CONFIGS[12]])
def test_padding(dtype, bs, h, d):
    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    raw, caches = _layers(dtype, bs, h, d)
    ref = raw.clone()
    slots = torch.tensor([7, -1, 2 * bs + 3, -1, bs - 1, 4 * bs])
    kv = _random_kv(len(slots), h, d, dtype)
    for li, cache in enumerate(ref.unbind(0)):  # vLLM's op skips -1 too
        _vllm_write(cache, kv[li, 0], kv[li, 1], slots, isa)
    scatter_tokens(kv, caches, slots, layout)
    assert_bytes_equal(raw, ref, "scatter skips -1")
    got = gather_tokens(caches, slots, layout)
    pad = slots < 0
    assert_bytes_equal(got[:, :, ~pad], kv[:, :, ~pad], "gather of the real slots")
    assert_bytes_equal(got[:, :, pad], torch.zeros_like(got[:, :, pad]), "gather writes zeros for -1")
    all_pad = torch.full((3,), -1, dtype=torch.int64)
    assert not gather_tokens(caches, all_pad, layout).any()
    before = raw.clone()
    scatter_tokens(torch.ones(L, 2, 3, h, d, dtype=dtype), caches, all_pad, layout)
    assert_bytes_equal(raw, before, "all padding: nothing written")
    empty = torch.empty(0, dtype=torch.int64)
    assert gather_tokens(caches, empty, layout).shape == (L, 2, 0, h, d)
    scatter_tokens(torch.empty(L, 2, 0, h, d, dtype=dtype), caches, empty, layout)


def test_large_requests_are_chunked(monkeypatch):
    """Many tokens go through in chunks (the element index is bounded); same bytes as one pass."""
    dtype, bs, h, d = torch.bfloat16, 32, 3, 64
    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    raw, caches = _layers(dtype, bs, h, d)
    ref = raw.clone()
    slots = _random_slots(NB * bs - 7, bs, seed=14)
    slots[[3, 50, 51]] = -1
    kv = _random_kv(len(slots), h, d, dtype, seed=15)
    for li, cache in enumerate(ref.unbind(0)):
        _vllm_write(cache, kv[li, 0], kv[li, 1], slots, isa)
    monkeypatch.setattr(cb, "_INDEX_ELEMENTS", 2 * h * d * 10)  # 10 tokens per chunk
    assert len(cb._chunks(len(slots), layout)) > 10
    scatter_tokens(kv, caches, slots, layout)
    assert_bytes_equal(raw, ref, "chunked scatter")
    kv[:, :, slots < 0] = 0
    assert_bytes_equal(gather_tokens(caches, slots, layout), kv, "chunked gather")


def test_argument_errors():
    dtype, bs, h, d = torch.float32, 32, 2, 64
    layout = probe_block_layout(_isa(dtype, bs, d), dtype, bs, h, d)
    raw, caches = _layers(dtype, bs, h, d)
    slots = torch.tensor([0, 5, 40])
    staging = torch.zeros(L, 2, 3, h, d)
    bad_gather = [
        (lambda: gather_tokens(caches, slots, "vec"), "layout"),
        (lambda: gather_tokens(raw, slots, layout), "caches: expected a list"),
        (lambda: gather_tokens([], slots, layout), "caches: empty"),
        (lambda: gather_tokens([caches[0], "x"], slots, layout), r"caches\[1\]: expected a tensor"),
        (lambda: gather_tokens([caches[0][:, :1]], slots, layout), r"caches\[0\]: expected shape"),
        (lambda: gather_tokens([caches[0], caches[1][:3]], slots, layout), r"caches\[1\]: 3 blocks"),
        (lambda: gather_tokens([caches[0].to(torch.bfloat16)], slots, layout), r"caches\[0\]: dtype"),
        (lambda: gather_tokens([torch.randn(NB, h, 2 * d, bs).transpose(2, 3)], slots, layout),
         r"caches\[0\]: strides .* dense"),
        (lambda: gather_tokens([torch.randn(4 * h * bs * 2 * d).as_strided((NB, h, bs, 2 * d),
                                                                          (bs * 2 * d, bs * 2 * d, 2 * d, 1))],
                               slots, layout), r"caches\[0\]: strides .* overlap"),
        (lambda: gather_tokens(caches, slots.int(), layout), "slots: expected a 1-D int64"),
        (lambda: gather_tokens(caches, slots.view(1, 3), layout), "slots: expected a 1-D int64"),
        (lambda: gather_tokens(caches, [0, 5], layout), "slots: expected an int64 tensor"),
        (lambda: gather_tokens(caches, torch.tensor([0, NB * bs]), layout), r"slots: .*\[0, 160\)"),
        (lambda: gather_tokens(caches, torch.tensor([-2, 1]), layout), "slots: values must be -1"),
    ]
    bad_scatter = [
        (lambda: scatter_tokens(staging[:1], caches, slots, layout), "staging: expected shape"),
        (lambda: scatter_tokens(staging.to(torch.bfloat16), caches, slots, layout), "staging: dtype"),
        (lambda: scatter_tokens(staging.numpy(), caches, slots, layout), "staging: expected a tensor"),
        (lambda: scatter_tokens(staging, caches, torch.tensor([3, 9, 3]), layout), "slots: slot 3 appears"),
        (lambda: scatter_tokens(staging, caches, torch.tensor([3, 999, 4]), layout), "slots: values"),
    ]
    before = raw.clone()
    for call, message in bad_gather + bad_scatter:
        with pytest.raises(ValueError, match=message):
            call()
    assert_bytes_equal(raw, before, "failed calls write nothing")
    assert isinstance(layout, BlockLayout)


# -- end to end: vLLM's attention reads a cache filled by scatter_tokens -------------------------------------

@pytest.mark.parametrize("dtype,bs,h,d", [CONFIGS[4], CONFIGS[8 + 2], CONFIGS[12 + 3]])
def test_vllm_attention_reads_scattered_tokens(dtype, bs, h, d):
    """cpu_attention_with_kv_cache over a cache written only by scatter_tokens gives the same output as over
    one written by vLLM's op, and matches a plain softmax attention on the canonical K/V."""
    isa = _isa(dtype, bs, d)
    layout = probe_block_layout(isa, dtype, bs, h, d)
    q_heads, seq, nq = 2 * h, 2 * bs + 6, 5
    block_table = torch.tensor([[3, 0, 4]], dtype=torch.int32)
    slots = torch.cat([block_table[0, j // bs].long().view(1) * bs + j % bs for j in range(seq)])
    g = torch.Generator().manual_seed(10)
    k, v = torch.randn(seq, h, d, generator=g).to(dtype), torch.randn(seq, h, d, generator=g).to(dtype)
    q = torch.randn(nq, q_heads, d, generator=g).to(dtype)
    by_op = torch.randn(NB, h, bs, 2 * d, generator=g).to(dtype)  # stale contents, the same in both
    by_us = by_op.clone()
    _vllm_write(by_op, k, v, slots, isa)
    scatter_tokens(torch.stack([k, v])[None], [by_us], slots, layout)

    def attend(cache):
        key_cache, value_cache = cache.view(NB, h, 2 * bs, d).chunk(2, dim=2)
        qsl, seq_lens = torch.tensor([0, nq], dtype=torch.int32), torch.tensor([seq], dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=1, num_heads=q_heads, num_kv_heads=h, head_dim=d, seq_lens=seq_lens, dtype=dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        out = torch.empty(nq, q_heads, d, dtype=dtype)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
            seq_lens=seq_lens, scale=d ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=block_table, softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return out

    out_us = attend(by_us)
    assert_bytes_equal(out_us, attend(by_op), "attention over scattered vs op-written cache")
    kk, vv = k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kk) * d ** -0.5
    causal = torch.arange(seq)[None, :] <= torch.arange(seq - nq, seq)[:, None]
    ref = torch.einsum("hqk,khd->qhd", logits.masked_fill(~causal, float("-inf")).softmax(-1), vv)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(out_us, ref, atol=tol, rtol=tol, what="attention vs reference")
