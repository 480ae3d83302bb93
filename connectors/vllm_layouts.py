"""Which kernels layout a vLLM KV cache tensor is in: a pure function of what vLLM tells us.

Dims as in `kernels.layout`: NB blocks, BS block size, H kv heads, D head dim, 2 the K/V pair, L layers.

vLLM 0.32 (RFC #42082) hands every attention layer over as a 4-D logical view `(NB, H, BS, C)` whose
strides follow the engine-wide `KVCacheLayout` (LBNHC, LBHNC, BLNHC, ...: the physical order of the
L, B, H, N and C axes). What the content dim C holds depends on the attention backend:
- CPU_ATTN: `(NB, H, BS, 2*D)`, per block and head a K tile then a V tile (cpu_attn.py views it as
  `(NB, H, 2*BS, D)` and chunks dim 2): our `vllm_cpu` layout. But the C++ kernels lay the tiles out as
  their ISA likes (with ISA "vec", K is stored transposed, `[D, BS]`: checked by writing one token with
  `ops.cpu_attn_reshape_and_cache`), so a token's bytes are not where the Python view says. Moving whole
  blocks is exact whatever the ISA; moving part of a block is not. Hence `whole_blocks`: loads of this
  layout end on a block boundary, chunks are whole blocks, and the ISA goes into the key.
- FlashAttention, FlashInfer, Triton, FlexAttention, HPC, ROCm AITER unified: C = `[K(D) | V(D)]` per token
  and head (`kv_cache.transpose(1, 2).split(head_size, -1)`). We permute the view into its physical order
  and split C into (2, D): "NB BS H 2 D" for LBNHC/NHD, "NB H BS 2 D" for LBHNC/HND, and so on.
- MLA backends: H = 1 and C = the latent; our `mla` layout `(NB, BS, D)`.
Older vLLM releases (the layouts in ARCHITECTURE.md) handed 5-D/6-D/3-D tensors; those shapes are
recognized too: `flash_attn` (2, NB, BS, H, D), `flash_attn_hnd`, `flashinfer` (NB, 2, BS, H, D),
`cross_layer` (NB, L, 2, BS, H, D) and `mla` (NB, BS, D).
Anything else is refused with a `KVLayoutError` at start-up: a guessed layout would store garbage.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import KVLayout, KVLayoutError
from kernels.layout import NAMED_LAYOUTS

# Backends whose content dim packs [K | V] per token and head (checked in vLLM 0.32's forward code).
PACKED_KV_BACKENDS = frozenset({"FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "FLEX_ATTENTION", "HPC_ATTN",
                                "ROCM_AITER_UNIFIED_ATTN"})
CPU_BACKENDS = frozenset({"CPU_ATTN"})
# Older vLLM: backends whose 5-D cache puts the K/V pair first, or second.
KV_FIRST_BACKENDS = frozenset({"FLASH_ATTN", "FLASH_ATTN_VLLM_V1", "FLEX_ATTENTION", "TREE_ATTN"})
KV_SECOND_BACKENDS = frozenset({"FLASHINFER", "FLASHINFER_VLLM_V1", "TRITON_ATTN", "TRITON_ATTN_VLLM_V1"})
# KVCacheLayout letters of a per-layer view (L is outside it) and what each becomes in our dims.
_LETTER_DIMS = {"B": ("NB",), "H": ("H",), "N": ("BS",), "C": ("2", "D")}
_LOGICAL = "BHNC"  # vLLM 0.32's logical per-layer order
_LEGACY_ALIASES = {"NHD": "LBNHC", "HND": "LBHNC"}


@dataclass(frozen=True)
class DetectedLayout:
    """How to hand one vLLM cache tensor to the kernels.

    name: our KVLayout name (a `kernels` named layout, or a dims spec such as "NB BS H 2 D").
    permute: applied to vLLM's tensor first (logical order -> physical order); None keeps it.
    split_content: then split the last dim (2*D) into (2, D).
    drop_heads: take head 0 of dim 1 (MLA's single latent "head").
    whole_blocks: bytes inside a block are laid out privately by the attention kernel, so only whole
        blocks may be moved (the view is a byte-exact bijection of a block, not a per-token one).
    """

    name: str
    permute: tuple[int, ...] | None = None
    split_content: bool = False
    drop_heads: bool = False
    whole_blocks: bool = False

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout.from_name(self.name) if self.name in NAMED_LAYOUTS else KVLayout.parse(self.name)

    def view(self, cache: torch.Tensor) -> torch.Tensor:
        """The tensor the kernels read: a view of `cache` (no copy) in this layout's dim order."""
        if self.permute is not None:
            cache = cache.permute(self.permute)
        if self.split_content:
            cache = cache.unflatten(-1, (2, cache.shape[-1] // 2))
        if self.drop_heads:
            cache = cache.select(1, 0)
        return cache


def _is_mla(backend: str) -> bool:
    return "MLA" in backend


def _physical_letters(vllm_layout: str) -> str:
    """Per-layer physical order of a KVCacheLayout name, e.g. "LBNHC" -> "BNHC"."""
    name = _LEGACY_ALIASES.get(vllm_layout, vllm_layout)
    if len(name) != 5 or sorted(name) != sorted("LBHNC"):
        raise KVLayoutError(f"kv cache layout: expected a vLLM KVCacheLayout name (LBNHC, LBHNC, BLNHC, BLHNC, "
                            f"LHBNC, BHLNC) or NHD/HND, got {vllm_layout!r}")
    return name.replace("L", "")


def _detect_4d(backend: str, shape: Sequence[int], vllm_layout: str) -> DetectedLayout:
    _nb, heads, _bs, content = shape
    letters = _physical_letters(vllm_layout)
    if backend in CPU_BACKENDS:
        if letters != "BHNC":
            raise KVLayoutError(f"kv cache: backend {backend} reads head-major blocks (LBHNC); vLLM reports "
                                f"layout {vllm_layout}, which this connector does not know how to read")
        return DetectedLayout("vllm_cpu", whole_blocks=True)
    if _is_mla(backend):
        if heads != 1:
            raise KVLayoutError(f"kv cache: MLA backend {backend} should have one latent head, got shape "
                                f"{tuple(shape)}")
        return DetectedLayout("mla", drop_heads=True)
    if backend in PACKED_KV_BACKENDS:
        if content % 2:
            raise KVLayoutError(f"kv cache: backend {backend} packs [K | V] in the last dim, which must be "
                                f"even; got shape {tuple(shape)}")
        permute = tuple(_LOGICAL.index(letter) for letter in letters)
        dims = " ".join(d for letter in letters for d in _LETTER_DIMS[letter])
        return DetectedLayout(dims, permute=None if permute == (0, 1, 2, 3) else permute, split_content=True)
    raise KVLayoutError(f"kv cache: attention backend {backend!r} is not supported by LMCacheCoreConnector "
                        f"(known: {sorted(CPU_BACKENDS | PACKED_KV_BACKENDS)} and MLA backends); its cache "
                        f"shape {tuple(shape)} with layout {vllm_layout} could mean several things, so "
                        "refusing rather than guessing")


def detect_layout(backend: str, shape: Sequence[int], vllm_layout: str | None) -> DetectedLayout:
    """Our layout for one layer's (or, cross-layer, the one) cache tensor.

    backend: the attention backend's `get_name()` ("CPU_ATTN", "FLASH_ATTN", "FLASHINFER", "FLASHMLA", ...).
    shape: the tensor's shape as vLLM hands it over. vllm_layout: vLLM's resolved KV cache layout name
    ("LBNHC", "LBHNC", ...; legacy "NHD"/"HND"); None means vLLM's old default (NHD).
    Raises KVLayoutError for anything not known for certain.
    """
    backend = backend.upper()
    shape = tuple(int(s) for s in shape)
    if vllm_layout is None:
        vllm_layout = "LBHNC" if backend in CPU_BACKENDS else "LBNHC"
    if len(shape) == 4:
        return _detect_4d(backend, shape, vllm_layout)
    hnd = _physical_letters(vllm_layout) in ("BHNC", "HBNC")
    if len(shape) == 3 and _is_mla(backend):
        return DetectedLayout("mla")
    if len(shape) == 6 and shape[2] == 2 and not hnd:
        return DetectedLayout("cross_layer")
    if len(shape) == 5 and backend in KV_FIRST_BACKENDS and shape[0] == 2:
        # legacy FlashAttention: logical (2, NB, BS, H, D); HND strides are physically (2, NB, H, BS, D)
        return DetectedLayout("flash_attn_hnd", permute=(0, 1, 3, 2, 4)) if hnd else DetectedLayout("flash_attn")
    if len(shape) == 5 and backend in KV_SECOND_BACKENDS and shape[1] == 2:
        return DetectedLayout("NB 2 H BS D", permute=(0, 1, 3, 2, 4)) if hnd else DetectedLayout("flashinfer")
    raise KVLayoutError(f"kv cache: no known layout for backend {backend!r}, shape {shape}, layout "
                        f"{vllm_layout}; LMCacheCoreConnector refuses to guess (see connectors/vllm_layouts.py for "
                        "the supported combinations)")


def expected_logical_shape(num_blocks: int, num_heads: int, block_size: int, head_size: int,
                           mla: bool) -> tuple[int, int, int, int]:
    """vLLM 0.32's per-layer logical shape (NB, H, BS, C) for an attention spec (used where no tensor exists,
    e.g. in the scheduler process)."""
    return (num_blocks, 1, block_size, head_size) if mla else (num_blocks, num_heads, block_size, 2 * head_size)
