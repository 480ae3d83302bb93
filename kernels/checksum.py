"""64-bit checksum of a KV chunk's bytes, computed on the device where the KV already is.

A chunk is a staging tensor `[L, 2, N, H, D]` (L layers, K/V, N tokens, H kv heads, D head dim), or any
other shape and dtype (bf16, fp16, fp32, float8, int8, uint8, ...); the checksum covers its bytes only,
never its dtype or shape (the stored chunk header carries those). Definition (version 1):
  - bytes b_0 .. b_{n-1}: the tensor's elements in C (row-major) order, each in its in-memory byte order
    (little-endian on every supported host and GPU). A non-contiguous tensor is copied to a contiguous
    one first, so the checksum of `t` always equals that of `t.contiguous()`.
  - 32-bit words w_i = b_{4i} | b_{4i+1} << 8 | b_{4i+2} << 16 | b_{4i+3} << 24 for i < ceil(n / 4);
    bytes past the end of the last word are 0.
  - fmix64(x) = MurmurHash3's 64-bit finalizer: x ^= x >> 33; x *= 0xFF51AFD7ED558CCD; x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53; x ^= x >> 33 (mod 2**64, logical shifts). Each step is invertible, so
    fmix64 is a bijection of 64-bit values.
  - S = sum_i fmix64(((i mod 2**32) << 32) | w_i) mod 2**64
  - checksum = fmix64((S + n * 0x9E3779B97F4A7C15) mod 2**64), returned as a Python int in [0, 2**64).
Guarantees, by construction: changing any bits inside one word (a single-bit flip in particular) changes
that word's term, because x -> fmix64(x) is a bijection and the word sits in x's low half at a fixed i, so
S changes by a nonzero amount mod 2**64, and the final fmix64 is a bijection again. The byte count enters
through an odd multiplier, so zero padding can never make two lengths agree (b"abc" != b"abc\\0"). Terms
are keyed by position, so swapped words or chunks change S (not guaranteed: heuristically a miss is as
unlikely as for a random 64-bit function, ~2**-64). The sum is
commutative mod 2**64, so the result does not depend on tiling or reduction order. Not a MAC: it catches
corruption, not an adversary (keys carry the collision-resistant chunk hash).
"""

import logging

import numpy as np
import torch
import triton
import triton.language as tl

from ._env import use_triton

logger = logging.getLogger(__name__)

# 8192 words (32 KiB) per program: not yet swept on a GPU. A memory-bound streaming reduction wants >= 4K
# words per program to amortize the launch and the partial store; under TRITON_INTERPRET (~0.7 ms per
# program) it keeps a 32 MiB chunk to 1024 programs.
BLOCK_WORDS = 8192
# Torch reference slab: 64K words (512 KiB per int64 buffer, two buffers) stays in L2 across its ~13
# passes: 65 ms vs 231 ms (1M words) and 101 ms (16K words) on a 33.5 MB chunk, 2-core Xeon, 1 thread.
_REF_SLAB_WORDS = 1 << 16

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_C1 = tl.constexpr(0xFF51AFD7ED558CCD)  # MurmurHash3 fmix64 multipliers (odd, so invertible mod 2**64)
_C2 = tl.constexpr(0xC4CEB9FE1A85EC53)
_LEN_MUL = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: n -> n * _LEN_MUL is injective mod 2**64


@triton.jit
def _fmix64(x):
    x ^= x >> 33
    x *= _C1
    x ^= x >> 33
    x *= _C2
    x ^= x >> 33
    return x


@triton.jit
def _kv_checksum_kernel(words_ptr, partial_ptr, n_words, BLOCK_W: tl.constexpr):
    """Program p writes sum(fmix64(((i mod 2**32) << 32) | w_i)) mod 2**64 over its BLOCK_W words."""
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = idx < n_words
    w = tl.load(words_ptr + idx, mask=mask, other=0)
    w = w.to(tl.uint32, bitcast=True).to(tl.uint64)  # zero-extend
    x = (idx << 32).to(tl.uint64, bitcast=True) | w  # int64 shl wraps: keeps i mod 2**32
    x = _fmix64(x)
    x = tl.where(mask, x, tl.zeros_like(x))
    tl.store(partial_ptr + pid, tl.sum(x, axis=0).to(tl.int64, bitcast=True))


def _fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = (x * _C1.value) & _MASK64
    x ^= x >> 33
    x = (x * _C2.value) & _MASK64
    return x ^ (x >> 33)


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _flat_bytes(staging: torch.Tensor) -> torch.Tensor:
    if not isinstance(staging, torch.Tensor):
        raise TypeError(f"staging: expected a torch.Tensor, got {type(staging).__name__}")
    if not staging.is_contiguous():
        logger.debug("kv_checksum: copying a non-contiguous %s tensor", tuple(staging.shape))
        staging = staging.contiguous()
    return staging.reshape(-1).view(torch.uint8)


def _split_words(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full 32-bit words of `flat` (uint8) as int32, and the 0-3 bytes after them."""
    n_full = flat.numel() // 4
    body = flat[:4 * n_full]
    try:
        words = body.view(torch.int32)
    except RuntimeError:  # a byte offset that is not a multiple of 4 cannot be viewed as int32
        words = body.clone().view(torch.int32)
    return words, flat[4 * n_full:]


def _tail_term(tail: torch.Tensor, n_full: int) -> int:
    """The mixed term of the last, zero-padded word (0 when the byte count is a multiple of 4)."""
    if tail.numel() == 0:
        return 0
    word = int.from_bytes(bytes(tail.cpu().tolist()), "little")
    return _fmix64_int(((n_full & _MASK32) << 32) | word)


def _finish(total: int, n_bytes: int) -> int:
    return _fmix64_int((total + n_bytes * _LEN_MUL) & _MASK64)


def _xor_shr33_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """x ^= x >> 33 with a logical shift (torch shifts int64 arithmetically: mask off the sign copies)."""
    torch.bitwise_right_shift(x, 33, out=tmp)
    tmp &= (1 << 31) - 1
    x ^= tmp


def _mixed_sum_torch(words: torch.Tensor) -> int:
    """sum_i fmix64(((i mod 2**32) << 32) | w_i) mod 2**64 over int32 `words`, in int64 with wrapping ops."""
    n = words.numel()
    if n == 0:
        return 0
    slab = min(_REF_SLAB_WORDS, n)
    # fmix64's first step on x = (i << 32) | w is x ^ (i >> 1) (w is only 32 bits wide), so one xor with
    # the position term P_i = (i << 32) | (i >> 1) replaces an or and a shift-xor (i taken mod 2**32).
    k_ = torch.arange(slab, dtype=torch.int64, device=words.device)
    pos0 = (k_ << 32) | (k_ >> 1)
    x = torch.empty(slab, dtype=torch.int64, device=words.device)
    tmp = torch.empty_like(x)
    c1, c2 = _signed(_C1.value), _signed(_C2.value)
    total = 0
    for start in range(0, n, slab):  # start is a multiple of slab (even): P_{start+k} = P_start + P_k
        k = min(slab, n - start)
        xs, ts = x[:k], tmp[:k]
        xs.copy_(words[start:start + k])  # sign-extends ...
        xs &= _MASK32  # ... so clear the high half: zero-extension
        s = start & _MASK32
        torch.add(pos0[:k], _signed((s << 32) | (s >> 1)), out=ts)
        xs ^= ts
        xs.mul_(c1)  # int64 multiply wraps mod 2**64: the same bits as uint64
        _xor_shr33_(xs, ts)
        xs.mul_(c2)
        _xor_shr33_(xs, ts)
        total += int(xs.sum())  # int64 sum wraps mod 2**64; reduced below
    return total & _MASK64


def kv_checksum_ref(staging: torch.Tensor) -> int:
    """Pure-torch `kv_checksum` (the CPU path and the test oracle): same bytes, same 64-bit value."""
    flat = _flat_bytes(staging)
    words, tail = _split_words(flat)
    total = _mixed_sum_torch(words) + _tail_term(tail, words.numel())
    return _finish(total, flat.numel())


def kv_checksum(staging: torch.Tensor) -> int:
    """64-bit checksum of `staging`'s bytes (definition in the module docstring) as a Python int.

    Runs the Triton kernel where `use_triton(staging)` (CUDA, or TRITON_INTERPRET=1), else the torch
    reference; both return the identical value. Synchronizes with the device (the result is a host int).
    """
    flat = _flat_bytes(staging)
    if not use_triton(flat):
        return kv_checksum_ref(staging)
    words, tail = _split_words(flat)
    n_words, total = words.numel(), 0
    if n_words:
        grid = (triton.cdiv(n_words, BLOCK_WORDS),)
        partial = torch.empty(grid[0], dtype=torch.int64, device=words.device)
        _kv_checksum_kernel[grid](words, partial, n_words, BLOCK_W=BLOCK_WORDS, num_warps=8)
        # numpy uint64 addition wraps mod 2**64 by definition (torch int64 overflow only does in practice)
        total = int(partial.cpu().numpy().view(np.uint64).sum(dtype=np.uint64))
    total += _tail_term(tail, n_words)
    return _finish(total, flat.numel())
