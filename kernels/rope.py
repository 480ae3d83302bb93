"""Re-rotate cached K from the positions it was computed at to new ones (RoPE re-positioning).

Dimension letters: L layers, N tokens, H kv heads, D head dim, R rotary dim (R <= D, even), F = R // 2
rotation pairs per head. Inputs are a staging tensor `[L, 2, N, H, D]` (only K, index 0 of dim 1, is
rotated; V is never read or written) or a K tensor `[N, H, D]`, any strides, rotated in place.

RoPE rotates pair f of a key at position p by the angle p * inv_freq[f]. Rotations compose, so a key
cached at `from_pos` becomes the key at `to_pos` by rotating pair f by delta * inv_freq[f] with
delta = to_pos - from_pos, per token. Pairs: neox style (f, f + F), GPT-J style (2f, 2f + 1); channels
R..D-1 are not touched.

Precision. A float32 product delta * inv_freq loses the angle: at delta = 131072 and inv_freq = 1 one
float32 ulp is 0.016 rad, and half of it is already about two bf16 roundings of the rotated values.
So the angle is reduced modulo one turn exactly, in integers: inv_freq / (2 pi) is held as a 60-bit
fixed-point fraction T (from float64), delta * T mod 2**60 is computed with int64 arithmetic, and the
top 24 bits become an angle in [-pi, pi) for tl.cos / tl.sin. Angle error <= 5e-7 rad for any
|delta| < 2**24 (quantisation 1.9e-7, float32 scaling 1.9e-7, T's own error < 1e-8), independent of delta.
The rotation runs in float32 and is cast back to K's dtype once, so the result is within one
rounding of K's dtype (plus ~1e-6 relative to the pair's norm) of the exact rotation. The reference
computes angles and cos/sin in float64 and rotates in float32.
Frequencies are float32, computed as HF/vLLM do, so the rotation uses the model's own inv_freq.
"""

import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from ._env import use_triton

# 64-token tiles: the interpreter costs ~0.7 ms per program, and 64 is the smallest tile the style
# guide allows; not yet swept on a GPU (no GPU in the session that wrote this).
BLOCK_N = 64
# 4 (layer, head) rows per program share one cos/sin tile: the integer reduction and tl.cos/tl.sin cost an
# estimated ~100 instructions per pair, on a par with moving a bf16 pair's 8 bytes; not yet swept on a GPU.
ROWS_PER_PROG = 4
# Fixed-point bits of inv_freq / (2 pi): 60 keeps every int64 product below 2**61 for |delta| < 2**31.
_TURN_BITS = 60

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@triton.jit
def _round_to(x, out_ty: tl.constexpr):
    """float32 -> out_ty, round to nearest even. Explicit for bfloat16: the interpreter truncates there."""
    if out_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        high = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        high = tl.where(x != x, 0x7FC0, high)  # keep NaN a NaN (the carry could make it an infinity)
        return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ty)


@triton.jit
def _rope_shift_kernel(
    k_ptr, delta_ptr, turns_ptr,
    n_tokens, n_heads, n_rows, n_pairs,
    stride_l, stride_n, stride_h, stride_d,
    IS_NEOX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, ROWS_PER_PROG: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_f = tl.arange(0, BLOCK_F).to(tl.int64)
    mask_n = offs_n < n_tokens
    mask_f = offs_f < n_pairs
    delta = tl.load(delta_ptr + offs_n, mask=mask_n, other=0)[:, None]
    turns = tl.load(turns_ptr + offs_f, mask=mask_f, other=0)[None, :]
    # delta * T mod 2**60 with T split in 30-bit halves: no product reaches 2**63 (module docstring).
    hi = ((delta * (turns >> 30)) & 0x3FFFFFFF) << 30
    lo = (delta * (turns & 0x3FFFFFFF)) & 0xFFFFFFFFFFFFFFF
    q = (((hi + lo) + 0x800000000) >> 36) & 0xFFFFFF  # nearest 2**-24 turn, in [0, 2**24)
    q = tl.where(q >= 0x800000, q - 0x1000000, q)  # [-2**23, 2**23): angle in [-pi, pi)
    angle = q.to(tl.float32) * 3.7450702829237954e-07  # 2 pi / 2**24
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if IS_NEOX:
        col1 = offs_f
        col2 = offs_f + n_pairs
    else:
        col1 = 2 * offs_f
        col2 = 2 * offs_f + 1
    tile_mask = mask_n[:, None] & mask_f[None, :]
    tok = offs_n[:, None] * stride_n
    off1 = tok + col1[None, :] * stride_d
    off2 = tok + col2[None, :] * stride_d
    for j in range(ROWS_PER_PROG):
        row = pid_r * ROWS_PER_PROG + j
        base = k_ptr + (row // n_heads) * stride_l + (row % n_heads) * stride_h
        # Compared as a tensor: Triton 3.9's interpreter types (bool tensor & bool scalar) as int8.
        m = tile_mask & ((offs_n * 0 + row) < n_rows)[:, None]
        a = tl.load(base + off1, mask=m, other=0.0).to(tl.float32)
        b = tl.load(base + off2, mask=m, other=0.0).to(tl.float32)
        tl.store(base + off1, _round_to(a * cos - b * sin, k_ptr.dtype.element_ty), mask=m)
        tl.store(base + off2, _round_to(b * cos + a * sin, k_ptr.dtype.element_ty), mask=m)


def rope_inv_freq(rotary_dim: int, rope_theta: float = 10000.0, rope_scaling: dict | None = None) -> torch.Tensor:
    """inv_freq `[R // 2]` float32 on the CPU, as HF/vLLM compute it, with "linear"/"llama3" scaling."""
    return _inv_freq_cached(rotary_dim, float(rope_theta), _scaling_key(rope_scaling)).clone()


def _scaling_key(rope_scaling: dict | None) -> tuple:
    if rope_scaling is None:
        return ()
    if not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling: expected a dict like an HF config's, got {type(rope_scaling).__name__}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return ()
    needed = {"linear": ("factor",), "llama3": _LLAMA3_KEYS}.get(kind)
    if needed is None:
        raise ValueError(
            f"rope_scaling: rope_type {kind!r} is not supported (supported: 'default', 'linear', 'llama3'); "
            "pass inv_freq= with the scheme's frequencies instead"
        )
    missing = [key for key in needed if key not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling: rope_type {kind!r} needs keys {list(needed)}, missing {missing}")
    values = tuple(float(rope_scaling[key]) for key in needed)
    if min(values) <= 0 or (kind == "llama3" and not values[2] > values[1]):
        raise ValueError(
            f"rope_scaling: expected positive values{' and high_freq_factor > low_freq_factor' * (kind == 'llama3')}"
            f", got {dict(zip(needed, values))}"
        )
    return (kind,) + values


@functools.lru_cache(maxsize=64)
def _inv_freq_cached(rotary_dim: int, rope_theta: float, scaling: tuple) -> torch.Tensor:
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    if scaling and scaling[0] == "linear":
        inv_freq = inv_freq / scaling[1]
    elif scaling:  # llama3: long wavelengths slowed by `factor`, short kept, a linear blend in between
        factor, low, high, original = scaling[1:]
        wavelen = 2 * math.pi / inv_freq
        blend = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        inv_freq = (1 - blend) * (inv_freq / factor) + blend * inv_freq
    return inv_freq


@functools.lru_cache(maxsize=64)
def _turns_on(inv_freq_key: tuple, device: torch.device) -> torch.Tensor:
    """inv_freq / (2 pi) as int64 fixed point with _TURN_BITS fraction bits, on `device`."""
    turns = torch.tensor(inv_freq_key, dtype=torch.float64) / (2 * math.pi)
    return torch.round(turns * 2.0**_TURN_BITS).to(torch.int64).to(device)


def _k_view(k: torch.Tensor) -> torch.Tensor:
    """K as `[L, N, H, D]` (a view, same storage) of a staging `[L, 2, N, H, D]` or K `[N, H, D]` tensor."""
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k: expected a torch.Tensor, got {type(k).__name__}")
    if k.dtype not in _DTYPES:
        hint = " (float8 K must be dequantized before it is re-rotated)" if "float8" in str(k.dtype) else ""
        raise TypeError(f"k: expected dtype float32, float16 or bfloat16, got {k.dtype}{hint}")
    if k.dim() == 5 and k.shape[1] == 2:
        return k[:, 0]
    if k.dim() == 3:
        return k.unsqueeze(0)
    raise ValueError(f"k: expected a staging tensor [L, 2, N, H, D] or K [N, H, D], got shape {tuple(k.shape)}")


def _positions(name: str, pos, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(pos, numbers.Integral) and not isinstance(pos, bool):
        return torch.full((n,), int(pos), dtype=torch.int64, device=device)
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name}: expected an int or an integer tensor [N], got {type(pos).__name__}")
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype, got {pos.dtype}")
    if tuple(pos.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},) (one position per token, N={n}), got {tuple(pos.shape)}")
    return pos.to(device=device, dtype=torch.int64)


def _resolve(k, from_pos, to_pos, rope_theta, rotary_dim, is_neox, rope_scaling, inv_freq):
    """Validate the arguments; return (K view [L, N, H, D], delta [N] int64, inv_freq [F] float32 CPU)."""
    k4 = _k_view(k)
    head_dim = k4.shape[-1]
    r = head_dim if rotary_dim is None else rotary_dim
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r <= 0 or r % 2 or r > head_dim:
        raise ValueError(f"rotary_dim: expected an even int in [2, D={head_dim}] or None, got {rotary_dim!r}")
    if not isinstance(is_neox, bool):
        raise TypeError(f"is_neox: expected a bool, got {type(is_neox).__name__}")
    if inv_freq is not None and rope_scaling is not None:
        raise ValueError("inv_freq and rope_scaling were both given: pass one (inv_freq already includes scaling)")
    if inv_freq is None:
        if not isinstance(rope_theta, numbers.Real) or not 1.0 < rope_theta < math.inf:
            raise ValueError(f"rope_theta: expected a finite number > 1 (e.g. 10000.0), got {rope_theta!r}")
        freqs, source = _inv_freq_cached(int(r), float(rope_theta), _scaling_key(rope_scaling)), "rope_scaling"
    else:
        freqs, source = torch.as_tensor(inv_freq).detach().to("cpu", torch.float32).reshape(-1), "inv_freq"
    # |inv_freq| < 8 keeps the fixed-point turns below 2**61 (the kernel's int64 headroom).
    if freqs.numel() != r // 2 or not bool(torch.isfinite(freqs).all()) or float(freqs.abs().max()) >= 8.0:
        raise ValueError(
            f"{source}: expected {r // 2} finite frequencies (rotary_dim // 2) of magnitude < 8, got "
            f"{freqs.numel()} values, max |value| {float(freqs.abs().max()) if freqs.numel() else None}"
        )
    n = k4.shape[1]
    delta = _positions("to_pos", to_pos, n, k.device) - _positions("from_pos", from_pos, n, k.device)
    return k4, delta, freqs


def _rotate_ref(k4: torch.Tensor, delta: torch.Tensor, freqs: torch.Tensor, is_neox: bool) -> None:
    f = freqs.numel()
    angle = delta.to(torch.float64)[:, None] * freqs.to(k4.device, torch.float64)[None, :]  # [N, F]
    cos = angle.cos().to(torch.float32)[None, :, None, :]
    sin = angle.sin().to(torch.float32)[None, :, None, :]
    x1 = k4[..., :f] if is_neox else k4[..., 0 : 2 * f : 2]
    x2 = k4[..., f : 2 * f] if is_neox else k4[..., 1 : 2 * f : 2]
    a, b = x1.to(torch.float32), x2.to(torch.float32)
    new1, new2 = a * cos - b * sin, b * cos + a * sin  # both computed before either half is written
    x1.copy_(new1)
    x2.copy_(new2)


def rope_shift_ref(k, from_pos, to_pos, rope_theta=10000.0, rotary_dim=None, is_neox=True, *,
                   rope_scaling=None, inv_freq=None):
    """Pure-torch `rope_shift` (the CPU path and the test oracle): float64 angles, float32 rotation."""
    k4, delta, freqs = _resolve(k, from_pos, to_pos, rope_theta, rotary_dim, is_neox, rope_scaling, inv_freq)
    _rotate_ref(k4, delta, freqs, is_neox)
    return k


def rope_shift(k, from_pos, to_pos, rope_theta=10000.0, rotary_dim=None, is_neox=True, *,
               rope_scaling=None, inv_freq=None):
    """Re-rotate K cached at `from_pos` to `to_pos`, in place; returns `k`.

    k: staging `[L, 2, N, H, D]` (K half only) or K `[N, H, D]`, float32/float16/bfloat16, any strides.
    from_pos, to_pos: int (same for every token) or integer tensor [N]; moved to k's device.
    rope_theta, rotary_dim (default D; only channels [0, R) rotate), is_neox (False: GPT-J pairs).
    rope_scaling: None or an HF-config dict with rope_type "default", "linear" or "llama3".
    inv_freq: [R // 2] frequencies for other schemes; overrides rope_theta (not combinable with rope_scaling).
    Error: within one rounding of K's dtype of the exact rotation (module docstring).
    """
    k4, delta, freqs = _resolve(k, from_pos, to_pos, rope_theta, rotary_dim, is_neox, rope_scaling, inv_freq)
    num_layers, n, heads, _ = k4.shape
    if n == 0 or num_layers * heads == 0:
        return k
    if not use_triton(k):
        _rotate_ref(k4, delta, freqs, is_neox)
        return k
    f = freqs.numel()
    turns = _turns_on(tuple(freqs.tolist()), k.device)
    rows = num_layers * heads
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(rows, ROWS_PER_PROG))
    _rope_shift_kernel[grid](
        k4, delta, turns,
        n, heads, rows, f,
        k4.stride(0), k4.stride(1), k4.stride(2), k4.stride(3),
        IS_NEOX=is_neox, BLOCK_N=BLOCK_N, BLOCK_F=max(16, triton.next_power_of_2(f)), ROWS_PER_PROG=ROWS_PER_PROG,
    )
    return k
