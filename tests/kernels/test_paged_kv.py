"""gather_kv / scatter_kv: Triton kernel == torch reference == a per-token loop, byte for byte, every layout."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import KVLayout, KVLayoutError, gather_kv, gather_kv_ref, scatter_kv, scatter_kv_ref
from kernels.layout import NAMED_LAYOUTS
from kernels.paged_kv import gather_kv_triton, scatter_kv_triton
from tests.helpers import DEVICE, as_bytes, assert_bytes_equal

LAYOUTS = sorted(NAMED_LAYOUTS)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8]


def make_caches(layout: KVLayout, L, NB, BS, H, D, dtype, device="cpu", fill=None):
    """Random (or `fill`-ed) caches in `layout`: a list of per-layer tensors, or one tensor with an L dim."""
    sizes = {"L": L, "2": 2, "NB": NB, "BS": BS, "H": H, "D": D}
    per_layer = [sizes[d] for d in layout.dims if d != "L"]
    shape = [sizes[d] for d in layout.dims]

    def one(shape):
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if fill is not None:
            raw = torch.full((n,), fill, dtype=torch.uint8, device=device)
        else:  # random bytes: every bit pattern, NaN payloads included, must survive the move
            raw = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
        return raw.view(dtype).view(shape)

    if layout.has_layers:
        return one(shape)
    caches = [one(per_layer) for _ in range(L)]
    if layout.packed_kv:  # vLLM's CPU backend hands over (NB, H, BS, 2*D)
        caches = [c.view(NB, H, BS, 2 * D) for c in caches]
    return caches


def layer_views(caches, layout):
    """Canonical [KV, NB, BS, H, D] views of each layer."""
    if layout.has_layers:
        return list(layout.canonical(caches).unbind(0))
    return [layout.canonical(c) for c in caches]


def gather_loop(caches, slots, layout):
    """The obvious per-token loop: the oracle for the vectorized reference."""
    layers = layer_views(caches, layout)
    KV, NB, BS, H, D = layers[0].shape
    out = torch.zeros((len(layers), KV, len(slots), H, D), dtype=layers[0].dtype, device=layers[0].device)
    for l, layer in enumerate(layers):
        for n, s in enumerate(slots.tolist()):
            if s >= 0:
                out[l, :, n] = layer[:, s // BS, s % BS]
    return out if layout.has_heads else out.squeeze(3)


def random_slots(num_slots, n, pad_every=0, unique=True, dtype=torch.int64, device="cpu"):
    slots = torch.randperm(num_slots)[:n] if unique else torch.randint(0, num_slots, (n,))
    if pad_every:
        slots[::pad_every] = -1
    return slots.to(dtype=dtype, device=device)


def caches_bytes(caches):
    return [as_bytes(c) for c in (caches if isinstance(caches, list) else [caches])]


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_per_token_loop(name, dtype):
    layout = KVLayout.from_name(name)
    caches = make_caches(layout, L=2, NB=5, BS=16, H=3, D=80, dtype=dtype)
    slots = random_slots(5 * 16, 50, pad_every=7, unique=False)
    assert_bytes_equal(gather_kv_ref(caches, slots, layout), gather_loop(caches, slots, layout), "gather_kv_ref")


SHAPES = [
    pytest.param(16, 1, 64, id="BS16-H1-D64"),
    pytest.param(128, 3, 80, id="BS128-H3-D80"),
    pytest.param(16, 8, 128, id="BS16-H8-D128"),
    pytest.param(16, 1, 576, id="BS16-H1-D576"),
]


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_gather_matches_reference_every_dtype(name, dtype):
    layout = KVLayout.from_name(name)
    caches = make_caches(layout, L=3, NB=6, BS=16, H=3, D=64, dtype=dtype, device=DEVICE)
    slots = random_slots(6 * 16, 77, pad_every=5, unique=False, device=DEVICE)
    assert_bytes_equal(gather_kv_triton(caches, slots, layout), gather_kv_ref(caches, slots, layout), "gather")


SIZES = [pytest.param(BS, H, D, N, id=f"{p.id}-N{N}") for p in SHAPES for (BS, H, D) in [p.values] for N in (1, 130)]
SIZES.append(pytest.param(128, 3, 80, 5000, id="BS128-H3-D80-N5000"))


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("BS,H,D,N", SIZES)
def test_triton_matches_reference_odd_sizes(name, BS, H, D, N):
    layout = KVLayout.from_name(name)
    NB = -(-max(N, 2 * BS) // BS) + 1
    caches = make_caches(layout, L=2, NB=NB, BS=BS, H=H, D=D, dtype=torch.bfloat16, device=DEVICE)
    slots = random_slots(NB * BS, N, pad_every=11 if N > 1 else 0, dtype=torch.int32, device=DEVICE)
    staging = gather_kv_triton(caches, slots, layout)
    assert_bytes_equal(staging, gather_kv_ref(caches, slots, layout), "gather")
    dst_triton = make_caches(layout, L=2, NB=NB, BS=BS, H=H, D=D, dtype=torch.bfloat16, device=DEVICE, fill=0xFF)
    dst_ref = make_caches(layout, L=2, NB=NB, BS=BS, H=H, D=D, dtype=torch.bfloat16, device=DEVICE, fill=0xFF)
    scatter_kv_triton(staging, dst_triton, slots, layout)
    scatter_kv_ref(staging, dst_ref, slots, layout)
    for a, b in zip(caches_bytes(dst_triton), caches_bytes(dst_ref)):
        assert_bytes_equal(a, b, "scatter")


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_round_trip_into_poisoned_cache_touches_only_mapped_slots(name, impl):
    gather, scatter = (gather_kv_triton, scatter_kv_triton) if impl == "triton" else (gather_kv_ref, scatter_kv_ref)
    layout = KVLayout.from_name(name)
    L, NB, BS, H, D = 2, 7, 16, 3, 64
    src = make_caches(layout, L, NB, BS, H, D, torch.bfloat16, device=DEVICE)
    slots = random_slots(NB * BS, 60, pad_every=9, device=DEVICE)
    staging = gather(src, slots, layout)
    poison = make_caches(layout, L, NB, BS, H, D, torch.bfloat16, device=DEVICE, fill=0xFF)  # 0xFFFF: a NaN payload
    scatter(staging, poison, slots, layout)

    real = slots[slots >= 0].tolist()
    for l, (got, want) in enumerate(zip(layer_views(poison, layout), layer_views(src, layout))):
        got, want = as_bytes(got), as_bytes(want)
        written = torch.zeros(NB, BS, dtype=torch.bool, device=got.device)
        for s in real:
            written[s // BS, s % BS] = True
        assert torch.equal(got[:, written], want[:, written]), f"layer {l}: mapped slots differ from the source"
        untouched = got[:, ~written]
        assert bool((untouched == -1).all()), f"layer {l}: a slot outside the mapping was written"
    assert_bytes_equal(gather(poison, slots, layout), staging, "gather after scatter")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(LAYOUTS),
    BS=st.sampled_from([16, 128]),
    H=st.sampled_from([1, 3, 8]),
    D=st.sampled_from([64, 80, 128]),
    data=st.data(),
)
def test_random_slot_mappings(name, BS, H, D, data):
    layout = KVLayout.from_name(name)
    NB = data.draw(st.integers(1, 4), label="NB")
    L = data.draw(st.integers(1, 3), label="L")
    slot = st.integers(-1, NB * BS - 1)
    slots = torch.tensor(data.draw(st.lists(slot, min_size=1, max_size=200), label="slots"), dtype=torch.int64,
                         device=DEVICE)
    caches = make_caches(layout, L, NB, BS, H, D, torch.float16, device=DEVICE)
    staging = gather_kv_triton(caches, slots, layout)
    assert_bytes_equal(staging, gather_kv_ref(caches, slots, layout), "gather triton vs ref")
    assert_bytes_equal(staging, gather_loop(caches, slots, layout), "gather vs per-token loop")

    unique = torch.tensor(list(dict.fromkeys(slots.tolist())), dtype=torch.int64, device=DEVICE)  # each slot once
    staging = gather_kv_ref(caches, unique, layout)
    dst_a = make_caches(layout, L, NB, BS, H, D, torch.float16, device=DEVICE, fill=0xAB)
    dst_b = make_caches(layout, L, NB, BS, H, D, torch.float16, device=DEVICE, fill=0xAB)
    scatter_kv_triton(staging, dst_a, unique, layout)
    scatter_kv_ref(staging, dst_b, unique, layout)
    for a, b in zip(caches_bytes(dst_a), caches_bytes(dst_b)):
        assert_bytes_equal(a, b, "scatter triton vs ref")


def scatter_loop(staging, caches, slots, layout):
    """The obvious per-token loop writing staging into the caches: the scatter oracle."""
    layers = layer_views(caches, layout)
    if not layout.has_heads:
        staging = staging.unsqueeze(3)
    BS = layers[0].shape[2]
    for l, layer in enumerate(layers):
        for n, s in enumerate(slots.tolist()):
            if s >= 0:
                layer[:, s // BS, s % BS] = staging[l, :, n]


def block_slots(NB, BS, kind):
    """Slot mappings shaped like an engine's: whole blocks in order, in a random order, a partial tail,
    or whole blocks with their tokens permuted (the fast paths must see the difference)."""
    blocks = {"consecutive": torch.arange(2, 6), "random": torch.randperm(NB)[:5],
              "two-runs": torch.tensor([1, 2, 3, 6, 7]), "partial": torch.arange(1, 4),
              "permuted": torch.arange(1, 4)}[kind]
    slots = (blocks[:, None] * BS + torch.arange(BS)).reshape(-1)
    if kind == "partial":
        slots = slots[:-1]
    if kind == "permuted":
        slots = slots[torch.randperm(slots.numel())]
    return slots


@pytest.mark.parametrize("spec", LAYOUTS + ["NB H BS 2 D", "2 NB H BS D", "NB D BS H 2"])
@pytest.mark.parametrize("kind", ["consecutive", "random", "two-runs", "partial", "permuted"])
@pytest.mark.parametrize("min_run_bytes", [0, None], ids=["runs-forced", "runs-default"])
def test_reference_block_paths_match_per_token_loop(spec, kind, min_run_bytes, monkeypatch):
    """Whole-block mappings take the block-rows or block-runs paths of the reference: same bytes as a loop."""
    import kernels.paged_kv as paged_kv
    if min_run_bytes is not None:
        monkeypatch.setattr(paged_kv, "_MIN_RUN_BYTES", min_run_bytes)
    layout = KVLayout.from_name(spec) if spec in NAMED_LAYOUTS else KVLayout.parse(spec)
    L, NB, BS, H, D = 2, 9, 16, 3, 64
    caches = make_caches(layout, L, NB, BS, H, D, torch.bfloat16)
    slots = block_slots(NB, BS, kind)
    staging = gather_kv_ref(caches, slots, layout)
    assert_bytes_equal(staging, gather_loop(caches, slots, layout), f"gather {kind}")
    got = make_caches(layout, L, NB, BS, H, D, torch.bfloat16, fill=0xFF)
    want = make_caches(layout, L, NB, BS, H, D, torch.bfloat16, fill=0xFF)
    scatter_kv_ref(staging, got, slots, layout)
    scatter_loop(staging, want, slots, layout)
    for a, b in zip(caches_bytes(got), caches_bytes(want)):
        assert_bytes_equal(a, b, f"scatter {kind}")


@pytest.mark.parametrize("spec", ["NB 2 BS H D", "2 NB H BS D", "NB BS D", "NB D BS H 2", "H NB BS 2 D", "L NB BS 2 H D"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_free_form_layouts(spec, impl):
    """parse() accepts any order, including D not innermost (the reference falls back to element rows)."""
    gather = gather_kv_triton if impl == "triton" else gather_kv_ref
    layout = KVLayout.parse(spec)
    caches = make_caches(layout, L=2, NB=4, BS=16, H=3, D=64, dtype=torch.bfloat16, device=DEVICE)
    slots = random_slots(64, 40, pad_every=6, unique=False, device=DEVICE)
    assert_bytes_equal(gather(caches, slots, layout), gather_loop(caches, slots, layout), spec)


def test_layers_as_views_of_one_buffer_in_any_order():
    """vLLM allocates layers as views into one buffer; their order in memory need not be the layer order."""
    layout = KVLayout.from_name("flash_attn")
    buf = torch.randn(4, 2, 6, 16, 3, 64, device=DEVICE).to(torch.bfloat16)
    caches = [buf[3], buf[0], buf[2], buf[1]]  # negative offsets from layer 0
    slots = random_slots(96, 50, pad_every=4, device=DEVICE)
    expected = gather_loop(caches, slots, layout)
    assert_bytes_equal(gather_kv_triton(caches, slots, layout), expected, "triton")
    assert_bytes_equal(gather_kv_ref(caches, slots, layout), expected, "torch")


def test_out_buffer_is_filled_and_returned():
    layout = KVLayout.from_name("flashinfer")
    caches = make_caches(layout, 2, 4, 16, 3, 64, torch.bfloat16)
    slots = random_slots(64, 20)
    out = torch.full((2, 2, 20, 3, 64), float("nan"), dtype=torch.bfloat16)
    assert gather_kv(caches, slots, layout, out=out) is out
    assert_bytes_equal(out, gather_loop(caches, slots, layout), "out")


def test_empty_mapping_is_a_no_op():
    layout = KVLayout.from_name("flash_attn")
    caches = make_caches(layout, 2, 4, 16, 3, 64, torch.bfloat16)
    empty = torch.empty(0, dtype=torch.int64)
    assert gather_kv(caches, empty, layout).shape == (2, 2, 0, 3, 64)
    before = [c.clone() for c in caches]
    scatter_kv(torch.empty(2, 2, 0, 3, 64, dtype=torch.bfloat16), caches, empty, layout)
    assert all(torch.equal(as_bytes(a), as_bytes(b)) for a, b in zip(before, caches))


def test_vllm_cpu_accepts_logical_and_packed_shapes():
    layout = KVLayout.from_name("vllm_cpu")
    logical = torch.randn(3, 2, 2, 16, 64)  # NB H 2 BS D
    packed = logical.view(3, 2, 16, 128)  # as vLLM reports it
    slots = random_slots(48, 30)
    assert torch.equal(gather_kv([logical], slots, layout), gather_kv([packed], slots, layout))
    # token t of block b, head h: K is row t of the first [BS, D] tile, V row t of the second
    staging = gather_kv([packed], torch.tensor([16 * 2 + 5]), layout)
    flat = packed[2, 1].reshape(-1)
    assert torch.equal(staging[0, 0, 0, 1], flat[5 * 64:6 * 64])
    assert torch.equal(staging[0, 1, 0, 1], flat[16 * 64 + 5 * 64:16 * 64 + 6 * 64])


# ----------------------------------------------------------------------------------------------------------
# Errors name the argument, the expected and the received value
# ----------------------------------------------------------------------------------------------------------


def _fa_caches(**kw):
    return make_caches(KVLayout.from_name("flash_attn"), 2, 4, 16, 3, 64, kw.get("dtype", torch.bfloat16))


@pytest.mark.parametrize("slots,exc,match", [
    (torch.tensor([0, 64]), ValueError, r"slot_mapping: slots must be -1 \(padding\) or in \[0, 64\).*\[0, 64\]"),
    (torch.tensor([-2, 3]), ValueError, r"slot_mapping: .*got values in \[-2, 3\]"),
    (torch.tensor([1.0, 2.0]), TypeError, r"slot_mapping: expected dtype int32 or int64, got torch.float32"),
    (torch.tensor([[1, 2]]), ValueError, r"slot_mapping: expected shape \[N\], got \(1, 2\)"),
    ([1, 2], TypeError, r"slot_mapping: expected a torch.Tensor, got list"),
])
def test_bad_slot_mapping(slots, exc, match):
    with pytest.raises(exc, match=match):
        gather_kv(_fa_caches(), slots, KVLayout.from_name("flash_attn"))


def test_scatter_rejects_repeated_slots():
    layout = KVLayout.from_name("flash_attn")
    with pytest.raises(ValueError, match="slot_mapping: scatter got a slot more than once"):
        scatter_kv(torch.zeros(2, 2, 2, 3, 64, dtype=torch.bfloat16), _fa_caches(), torch.tensor([5, 5]), layout)


def test_bad_out_and_staging():
    layout = KVLayout.from_name("flash_attn")
    caches, slots = _fa_caches(), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 2, 3, 3, 64\).*got \(2, 2, 2, 3, 64\) \(too small\)"):
        gather_kv(caches, slots, layout, out=torch.empty(2, 2, 2, 3, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"out: expected the caches' dtype torch.bfloat16, got torch.float16"):
        gather_kv(caches, slots, layout, out=torch.empty(2, 2, 3, 3, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="out: must be contiguous"):
        gather_kv(caches, slots, layout, out=torch.empty(2, 2, 3, 64, 3, dtype=torch.bfloat16).transpose(3, 4))
    with pytest.raises(ValueError, match=r"staging: expected shape \(2, 2, 3, 3, 64\)"):
        scatter_kv(torch.empty(2, 2, 4, 3, 64, dtype=torch.bfloat16), caches, slots, layout)


def test_bad_caches_and_layouts():
    layout = KVLayout.from_name("flash_attn")
    slots = torch.tensor([1])
    with pytest.raises(TypeError, match="kv_caches: layout flash_attn has no L dim, so expected a non-empty sequence"):
        gather_kv(torch.zeros(2, 4, 16, 3, 64), slots, layout)
    with pytest.raises(KVLayoutError, match=r"kv cache: layout flash_attn \(2 NB BS H D\) expects 5 dims, got shape \(4, 16, 3, 64\)"):
        gather_kv([torch.zeros(4, 16, 3, 64)], slots, layout)
    with pytest.raises(KVLayoutError, match=r"the '2' dim of layout flash_attn has size 3"):
        gather_kv([torch.zeros(3, 4, 16, 3, 64)], slots, layout)
    with pytest.raises(ValueError, match=r"kv_caches\[1\]: shape \(2, 5, 16, 3, 64\) differs from layer 0's \(2, 4, 16, 3, 64\)"):
        gather_kv([torch.zeros(2, 4, 16, 3, 64), torch.zeros(2, 5, 16, 3, 64)], slots, layout)
    with pytest.raises(ValueError, match=r"kv_caches\[1\]: dtype torch.float16 differs"):
        gather_kv([torch.zeros(2, 4, 16, 3, 64), torch.zeros(2, 4, 16, 3, 64, dtype=torch.float16)], slots, layout)
    with pytest.raises(TypeError, match=r"kv_caches\[1\]: expected a torch.Tensor, got list"):
        gather_kv([torch.zeros(2, 4, 16, 3, 64), [0.0]], slots, layout)
    with pytest.raises(ValueError, match=r"kv_caches\[2\]: strides \(.*\) differs from layer 0's"):
        gather_kv([torch.zeros(2, 4, 16, 3, 64)] * 2 + [torch.zeros(2, 4, 3, 16, 64).transpose(2, 3)], slots, layout)
    with pytest.raises(TypeError, match="kv_caches: dtype torch.int64 is not supported"):
        gather_kv([torch.zeros(2, 4, 16, 3, 64, dtype=torch.int64)], slots, layout)
    with pytest.raises(TypeError, match="kv_caches: layout cross_layer has an L dim, so expected one tensor"):
        gather_kv([torch.zeros(4, 2, 2, 16, 3, 64)], slots, KVLayout.from_name("cross_layer"))
    with pytest.raises(KVLayoutError, match=r"layout name: expected one of .*got 'flash'"):
        KVLayout.from_name("flash")
    with pytest.raises(KVLayoutError, match=r"layout dims: \('2', 'BS', 'H', 'D'\) lacks \['NB'\]"):
        KVLayout.parse("2 BS H D")
    with pytest.raises(KVLayoutError, match=r"layout dims: \['H'\] appear more than once"):
        KVLayout.parse("NB BS H H D")
    with pytest.raises(KVLayoutError, match=r"layout dims: unknown dim\(s\) \['X'\]"):
        KVLayout.parse("NB BS X D")
    with pytest.raises(TypeError, match="layout: expected a KVLayout"):
        gather_kv([torch.zeros(2, 4, 16, 3, 64)], slots, "flash_attn")


def test_forced_triton_backend_without_cuda_or_interpreter_fails_loudly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="the Triton backend was asked for"):
        gather_kv_triton(_fa_caches(), torch.tensor([1]), KVLayout.from_name("flash_attn"))
    monkeypatch.setenv("LMCACHE_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"LMCACHE_KERNEL_BACKEND: expected one of .*got 'cuda'"):
        gather_kv(_fa_caches(), torch.tensor([1]), KVLayout.from_name("flash_attn"))
