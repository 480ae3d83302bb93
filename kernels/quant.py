"""Lossy KV codecs on staging tensors: int8, fp8 (e4m3) and int4 with bf16 scales, one Triton pass over the KV.

Dims: L layers, KV = 2 (K, V) or 1 (MLA), N tokens, H kv heads, D head dim, NT = ceil(N / TOKEN_TILE)
token tiles. Staging is `[L, KV, N, H, D]` (`[L, 1, N, D]` for MLA) in bf16, fp16 or fp32.

Scale groups (one bf16 scale, plus a bf16 offset for int4, per group):
| codec | K (kv 0)                         | V (kv 1), MLA                          | data          |
|-------|----------------------------------|----------------------------------------|---------------|
| int8  | per channel per 64-token tile    | per token per head                     | int8, sym     |
| fp8   | per token per head               | per token per head                     | float8_e4m3fn |
| int4  | per channel per 64-token tile    | per token per `group_size` run along D | 2 per byte, asym |

Why (measured on the real SmolLM2-135M KV, /work/shared/data/smollm2_135m_kv_512.safetensors, relative
L2 error ||x - x^|| / ||x|| over K and V together):
- int8 per token per head misses the 1% target (1.04%; K alone 1.10%): post-RoPE K has outlier channels
  (per-channel max |K| median 3.8, p99 14, max 21) that set every token's scale. Per-channel K scales over
  64-token tiles (KIVI) give 0.50% (K 0.45%, V 0.68%) at the same cost: 2 bytes per 64 elements, 1.94x.
- fp8 keeps ~3 significant bits whatever the scale, so channel scales do not help (K 2.6% per channel vs
  2.1% per token); per token per head: 2.18%, 1.94x.
- int4 symmetric misses 8% (K per channel + V per token in groups of 32: 8.0%), because post-RoPE K
  channels are offset from 0. Asymmetric (scale and offset: x^ = q * scale + offset, q in [0, 15]),
  K per channel per 64-token tile, V per token in groups of 64: 5.8% (K 4.6%, V 9.6%), 3.56x.
  bf16 or fp16 for scale and offset measure the same (5.79%); bf16 keeps fp32's range.
Rounding: the same fp32 ops in the same order in torch and Triton. scale = bf16(amax / 127) (/ 448 for fp8;
int4: offset = bf16(min), scale = bf16((max - offset) / 15)); y = (x - offset) * (1 / scale), the
reciprocal by IEEE division (`div_rn`) and no fused multiply-add; q = round-half-even(y), clamped;
x^ = q * scale (+ offset), exact in fp32, then rounded to the staging dtype. int8/int4 data and scales
are byte-identical between the paths; fp8 too on GPU (Triton's CPU interpreter mis-rounds some fp32 ->
e4m3 casts). Lossy codecs expect finite inputs (the lossless codec, kernels/shuffle.py, takes any bits).

QuantizedKV = (data, scales, meta), plain fields for the storage layer (no pickle):
- data: int8 / float8_e4m3fn `[L, KV, N, H, D]`, or uint8 `[L, KV, N, H, D/2]` for int4 (byte j of a head
  row holds q[2j] in its low nibble and q[2j+1] in its high nibble; q in [0, 15]). MLA drops the H dim.
- scales: bf16 `[L, S]`: per layer, K's scale groups then V's, flat. A per-channel section is `[NT, H, D,
  C]`, a per-token one `[N, H, G, C]` (G groups along D); C = 1 (scale) or 2 (scale, offset) for int4.
- meta: QuantMeta (strings, ints and a tuple of ints: `to_dict()` / `from_dict()`).

This file: the format, the torch reference and the staging launchers. The Triton kernels:
kernels/quant_kernels.py. Fused with the paged transfer (gather + quantize, dequantize + scatter):
kernels/quant_paged.py.
"""

from dataclasses import asdict, dataclass

import torch

from ._env import use_triton
from .quant_kernels import KVView, launch_dequantize, launch_quantize

# The quantization codecs: what `quantize_kv(codec=...)` takes.
QUANT_CODECS = ("int8", "fp8", "int4")
# K per-channel scales cover one 64-token tile, which is also a program's token tile, so gather + quantize
# stays one pass. 64 keeps scales at 2 bytes per 64 elements (1.94x for int8); 32 lowers int4 error (K 4.6%
# -> 3.9%) but costs 3.37x.
TOKEN_TILE = 64
# int4 V groups along D: 64 (all of D=64) measured 5.8% at 3.56x; 32 would need 3.37x.
INT4_GROUP = 64
SCALE_DTYPE = torch.bfloat16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 15.0}
_DATA_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "int4": torch.uint8}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class QuantMeta:
    """How to read `QuantizedKV.data`/`scales`: only strings, ints and a tuple of ints."""

    codec: str  # "int8" | "fp8" | "int4"
    dtype: str  # the staging dtype: "bfloat16" | "float16" | "float32"
    shape: tuple[int, ...]  # the staging shape, [L, KV, N, H, D] or [L, 1, N, D]
    k_grouping: str  # "channel" (per channel per token_tile tokens) or "token" (per token, groups along D)
    token_tile: int  # tokens per channel-scale tile
    group_size: int  # D elements per per-token group (D itself for int8/fp8)

    def __post_init__(self):
        if self.codec not in QUANT_CODECS:
            raise ValueError(f"codec: expected one of {QUANT_CODECS}, got {self.codec!r}")
        if self.k_grouping not in ("channel", "token"):
            raise ValueError(f"k_grouping: expected 'channel' or 'token', got {self.k_grouping!r}")
        if self.dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"dtype: expected one of {sorted(_DTYPE_NAMES.values())}, got {self.dtype!r}")
        if len(self.shape) not in (4, 5) or min(self.shape, default=-1) < 0:
            raise ValueError(f"shape: expected [L, KV, N, H, D] or [L, 1, N, D], got {self.shape}")
        if self.token_tile < 1 or self.token_tile & (self.token_tile - 1):
            raise ValueError(f"token_tile: expected a power of two (a kernel tile), got {self.token_tile}")
        if self.group_size < 1 or (self.codec == "int4" and (self.group_size % 2 or self.shape[-1] % 2)):
            raise ValueError(f"int4 packs two values per byte along D: D ({self.shape[-1]}) and group_size "
                             f"({self.group_size}) must be even")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def qmax(self) -> float:
        """The largest code: 127 (int8), 448 (fp8 e4m3's largest finite value), 15 (int4's codes 0..15)."""
        return _QMAX[self.codec]

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """(L, KV, N, H, D), H = 1 for MLA."""
        s = self.shape
        return (s[0], s[1], s[2], s[3], s[4]) if len(s) == 5 else (s[0], s[1], s[2], 1, s[3])

    @property
    def fields(self) -> int:
        """Scale fields per group: 2 (scale, offset) for the asymmetric int4 codec, else 1."""
        return 2 if self.codec == "int4" else 1

    @property
    def num_groups(self) -> int:
        return -(-self.dims[4] // self.group_size)

    def section_sizes(self) -> tuple[int, ...]:
        """Number of bf16 values in each kv's scale section of one layer."""
        _, kv, n, h, d = self.dims
        token = n * h * self.num_groups * self.fields
        channel = -(-n // self.token_tile) * h * d * self.fields
        return tuple(channel if (i == 0 and self.k_grouping == "channel") else token for i in range(kv))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantMeta":
        return cls(**{**d, "shape": tuple(int(v) for v in d["shape"])})


@dataclass(frozen=True)
class QuantizedKV:
    """A quantized staging tensor: `data`, flat bf16 `scales` [L, S] and `meta` (see the module docstring)."""

    data: torch.Tensor
    scales: torch.Tensor
    meta: QuantMeta

    def __post_init__(self):  # parts may come from storage: refuse any that do not fit together
        m = self.meta
        want = (*m.shape[:-1], m.shape[-1] // 2 if m.codec == "int4" else m.shape[-1])
        if self.data.dtype != _DATA_DTYPE[m.codec] or tuple(self.data.shape) != want:
            raise ValueError(f"data: {m.codec} of {tuple(m.shape)} needs {_DATA_DTYPE[m.codec]} {want}, got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")
        want = (m.dims[0], sum(m.section_sizes()))
        if self.scales.dtype != SCALE_DTYPE or tuple(self.scales.shape) != want:
            raise ValueError(f"scales: expected {SCALE_DTYPE} {want}, got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")

    @property
    def nbytes(self) -> int:
        """Payload bytes: data plus scales (the metadata itself is a few dozen bytes of header)."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def scale_groups(self, kv: int) -> torch.Tensor:
        """kv's scales as `[L, NT, H, D, C]` (per channel) or `[L, N, H, G, C]` (per token): a view."""
        L, _, n, h, d = self.meta.dims
        sizes = self.meta.section_sizes()
        sec = self.scales[:, sum(sizes[:kv]):sum(sizes[:kv + 1])]
        if kv == 0 and self.meta.k_grouping == "channel":
            return sec.view(L, -(-n // self.meta.token_tile), h, d, self.meta.fields)
        return sec.view(L, n, h, self.meta.num_groups, self.meta.fields)


def make_meta(staging: torch.Tensor, codec: str, k_grouping: str | None, group_size: int | None) -> QuantMeta:
    """Validate quantize arguments and fix the grouping (defaults: the measured choices above)."""
    if not isinstance(staging, torch.Tensor):
        raise TypeError(f"staging: expected a torch.Tensor, got {type(staging).__name__}")
    if staging.dtype not in FLOAT_DTYPES:
        raise TypeError(f"staging: expected dtype bfloat16, float16 or float32, got {staging.dtype}")
    ok = (staging.dim() == 5 and staging.shape[1] in (1, 2)) or (staging.dim() == 4 and staging.shape[1] == 1)
    if not ok:
        raise ValueError(f"staging: expected [L, KV, N, H, D] with KV 1 or 2, or MLA [L, 1, N, D]; "
                         f"got shape {tuple(staging.shape)}")
    if codec not in QUANT_CODECS:
        raise ValueError(f"codec: expected one of {QUANT_CODECS}, got {codec!r}")
    d = staging.shape[-1]
    if k_grouping is None:
        k_grouping = "channel" if codec != "fp8" and staging.dim() == 5 and staging.shape[1] == 2 else "token"
    if codec != "int4":
        group_size = d
    elif group_size is None:
        group_size = min(INT4_GROUP, d)
    return QuantMeta(codec, _DTYPE_NAMES[staging.dtype], tuple(staging.shape), k_grouping, TOKEN_TILE,
                     int(group_size))


def empty_quantized(meta: QuantMeta, device: torch.device) -> QuantizedKV:
    L, kv, n, h, d = meta.dims
    data_shape = list(meta.shape)
    if meta.codec == "int4":
        data_shape[-1] //= 2
    data = torch.empty(data_shape, dtype=_DATA_DTYPE[meta.codec], device=device)
    scales = torch.empty((L, sum(meta.section_sizes())), dtype=SCALE_DTYPE, device=device)
    return QuantizedKV(data, scales, meta)


# ---------------------------------------------------------------------------------------------------------
# Pure-torch reference: the CPU path and the tests' oracle. Same fp32 ops in the same order as the kernels.
# Ragged groups (the last token tile, the last group along D) are padded by repeating their last element,
# which changes no min or max.
# ---------------------------------------------------------------------------------------------------------


def _pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    idx = torch.arange(size, device=x.device).clamp(max=x.shape[dim] - 1)
    return x.index_select(dim, idx)


def _grouped(x: torch.Tensor, channel: bool, meta: QuantMeta) -> torch.Tensor:
    """x [L, N, H, D] fp32 -> [L, NT, TILE, H, D] (reduce dim 2) or [L, N, H, G, group] (reduce dim 4)."""
    L, n, h, d = x.shape
    if channel:
        nt = -(-n // meta.token_tile)
        return _pad_to(x, 1, nt * meta.token_tile).view(L, nt, meta.token_tile, h, d)
    return _pad_to(x, 3, meta.num_groups * meta.group_size).view(L, n, h, meta.num_groups, meta.group_size)


def _ungrouped(y: torch.Tensor, channel: bool, n: int, d: int) -> torch.Tensor:
    if channel:
        return y.flatten(1, 2)[:, :n]
    return y.flatten(3, 4)[..., :d]


def _inverse(s: torch.Tensor) -> torch.Tensor:
    """1 / s in fp32 (IEEE division), 0 where s is 0: an all-zero group quantizes to zeros."""
    pos = s > 0
    return torch.where(pos, 1.0 / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s))


def quantize_kv_ref(staging, codec="int8", *, k_grouping=None, group_size=None) -> QuantizedKV:
    """`quantize_kv` on the pure-torch path."""
    meta = make_meta(staging, codec, k_grouping, group_size)
    L, num_kv, n, h, d = meta.dims
    x5 = staging.reshape(L, num_kv, n, h, d).float()
    qmax = meta.qmax
    datas, sections = [], []
    for kv in range(num_kv):  # K then V: two iterations, every token and layer at once
        channel = kv == 0 and meta.k_grouping == "channel"
        xg = _grouped(x5[:, kv], channel, meta)
        red = 2 if channel else 4
        if codec == "int4":
            lo = xg.amin(red, keepdim=True).to(SCALE_DTYPE).float()
            s = ((xg.amax(red, keepdim=True) - lo) / qmax).to(SCALE_DTYPE).float()
            y = (xg - lo) * _inverse(s)
            q = torch.round(y).clamp(0, qmax).to(torch.uint8)
            fields = torch.cat([s, lo], dim=red)
        else:
            s = (xg.abs().amax(red, keepdim=True) / qmax).to(SCALE_DTYPE).float()
            y = xg * _inverse(s)
            if codec == "fp8":
                q = y.clamp(-qmax, qmax).to(torch.float8_e4m3fn)
            else:
                q = torch.round(y).clamp(-qmax, qmax).to(torch.int8)
            fields = s
        q = _ungrouped(q, channel, n, d)
        if codec == "int4":
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        datas.append(q)
        # [L, NT, 1, H, D] -> [L, NT, H, D, C]; [L, N, H, G, 1] -> [L, N, H, G, C]
        fields = fields.movedim(2, -1) if channel else fields
        sections.append(fields.to(SCALE_DTYPE).reshape(L, meta.section_sizes()[kv]))
    data = torch.stack(datas, 1).reshape(*meta.shape[:-1], d // 2 if codec == "int4" else d)
    return QuantizedKV(data, torch.cat(sections, 1).contiguous(), meta)


def dequantize_kv_ref(q: QuantizedKV) -> torch.Tensor:
    """`dequantize_kv` on the pure-torch path."""
    meta = q.meta
    L, num_kv, n, h, d = meta.dims
    data = q.data.reshape(L, num_kv, n, h, q.data.shape[-1])
    outs = []
    for kv in range(num_kv):
        channel = kv == 0 and meta.k_grouping == "channel"
        groups = q.scale_groups(kv).float()
        if channel:
            groups = groups.movedim(-1, 2)  # [L, NT, C, H, D]: C plays the tile's token dim
        v = data[:, kv]
        if meta.codec == "int4":
            v = torch.stack([v & 15, v >> 4], -1).flatten(-2)
        xg = _grouped(v.float(), channel, meta)
        red = 2 if channel else 4
        s = groups.narrow(red, 0, 1)
        xg = xg * s
        if meta.codec == "int4":
            xg = xg + groups.narrow(red, 1, 1)
        outs.append(_ungrouped(xg, channel, n, d))
    return torch.stack(outs, 1).to(meta.torch_dtype).reshape(meta.shape)


# ---------------------------------------------------------------------------------------------------------
# Public launchers
# ---------------------------------------------------------------------------------------------------------


def quantize_kv(staging, codec="int8", *, k_grouping=None, group_size=None) -> QuantizedKV:
    """Quantize staging `[L, KV, N, H, D]` (or MLA `[L, 1, N, D]`) with `codec` ("int8", "fp8", "int4").

    k_grouping: "channel" or "token" for K (default: channel for int8/int4, token for fp8 and MLA).
    group_size: int4 elements per per-token group along D (default 64, or D when smaller).
    """
    meta = make_meta(staging, codec, k_grouping, group_size)
    if staging.numel() == 0 or not use_triton(staging):
        return quantize_kv_ref(staging, codec, k_grouping=k_grouping, group_size=group_size)
    q = empty_quantized(meta, staging.device)
    launch_quantize(q, KVView.staging(staging.unsqueeze(3) if staging.dim() == 4 else staging))  # any strides
    return q


def dequantize_kv(q: QuantizedKV) -> torch.Tensor:
    """The staging tensor `q` was made from, up to the codec's rounding (its dtype and shape)."""
    if not isinstance(q, QuantizedKV):
        raise TypeError(f"q: expected a QuantizedKV (from quantize_kv), got {type(q).__name__}")
    if q.data.numel() == 0 or not use_triton(q.data):
        return dequantize_kv_ref(q)
    out = torch.empty(q.meta.shape, dtype=q.meta.torch_dtype, device=q.data.device)
    launch_dequantize(q, KVView.staging(out.view(q.meta.dims)))
    return out
