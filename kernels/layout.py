"""Paged KV-cache layouts: which logical dim each axis of an engine's cache tensor holds.

Dims: L layers, 2 the K/V pair, NB paged blocks, BS block size (tokens per block), H kv heads, D head dim.
A layout is the order of these dims in one cache tensor, outermost first. `L` is present only when one
tensor holds every layer (`cross_layer`); `2` and `H` are absent for MLA, whose latent cache has neither.
"""

from dataclasses import dataclass

import torch

from .errors import KVLayoutError

DIMS = ("L", "2", "NB", "BS", "H", "D")
_REQUIRED = ("NB", "BS", "D")

# The layouts vLLM hands over (see ARCHITECTURE.md): name -> dims, outermost first.
NAMED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "flash_attn": ("2", "NB", "BS", "H", "D"),
    "flash_attn_hnd": ("2", "NB", "H", "BS", "D"),
    "flashinfer": ("NB", "2", "BS", "H", "D"),
    "vllm_cpu": ("NB", "H", "2", "BS", "D"),
    "mla": ("NB", "BS", "D"),
    "cross_layer": ("NB", "L", "2", "BS", "H", "D"),
}


@dataclass(frozen=True)
class KVLayout:
    """The order of the logical dims of a paged KV cache tensor.

    `packed_kv` marks vLLM's CPU backend, which reports its `(NB, H, 2, BS, D)` cache as `(NB, H, BS, 2*D)`:
    each (block, head) holds a `[BS, D]` K tile followed by a `[BS, D]` V tile. Both shapes are accepted.
    """

    dims: tuple[str, ...]
    name: str | None = None
    packed_kv: bool = False

    def __post_init__(self):
        unknown = [d for d in self.dims if d not in DIMS]
        if unknown:
            raise KVLayoutError(f"layout dims: unknown dim(s) {unknown}; expected a subset of {DIMS}")
        repeated = sorted({d for d in self.dims if self.dims.count(d) > 1})
        if repeated:
            raise KVLayoutError(f"layout dims: {repeated} appear more than once in {self.dims}")
        missing = [d for d in _REQUIRED if d not in self.dims]
        if missing:
            raise KVLayoutError(f"layout dims: {self.dims} lacks {missing}; every layout has NB, BS and D")
        if self.packed_kv and self.dims[-3:] != ("2", "BS", "D"):
            raise KVLayoutError(f"packed_kv needs dims ending in ('2', 'BS', 'D'), got {self.dims}")

    @classmethod
    def from_name(cls, name: str) -> "KVLayout":
        if name not in NAMED_LAYOUTS:
            raise KVLayoutError(f"layout name: expected one of {sorted(NAMED_LAYOUTS)}, got {name!r}")
        return cls(NAMED_LAYOUTS[name], name=name, packed_kv=name == "vllm_cpu")

    @classmethod
    def parse(cls, spec: str) -> "KVLayout":
        """A free-form layout such as "NB 2 BS H D" (whitespace or comma separated, any order)."""
        if not isinstance(spec, str):
            raise TypeError(f"layout spec: expected a str such as 'NB 2 BS H D', got {type(spec).__name__}")
        dims = tuple(spec.replace(",", " ").upper().split())
        return cls(dims, name=" ".join(dims))

    @property
    def has_layers(self) -> bool:
        """Whether one tensor holds every layer (an `L` dim)."""
        return "L" in self.dims

    @property
    def num_kv(self) -> int:
        """2 for K and V, 1 for a latent (MLA) cache."""
        return 2 if "2" in self.dims else 1

    @property
    def has_heads(self) -> bool:
        return "H" in self.dims

    def __str__(self) -> str:
        return self.name or " ".join(self.dims)

    def canonical(self, cache: torch.Tensor) -> torch.Tensor:
        """A view of `cache` with dims ([L,] 2, NB, BS, H, D); absent `2`/`H` become size-1 dims.

        No copy: the view's strides say where every element lives.
        """
        ndim = len(self.dims)
        if self.packed_kv and cache.dim() == ndim - 1:
            *outer, bs, packed = cache.shape
            if packed % 2:
                raise KVLayoutError(f"kv cache: layout {self} expects a last dim of 2*D, got odd {packed}")
            if cache.stride(-1) != 1 or cache.stride(-2) != packed:
                raise KVLayoutError(f"kv cache: layout {self} needs its (BS, 2*D) tiles contiguous, "
                                    f"got strides {tuple(cache.stride())}")
            cache = cache.view(*outer, 2, bs, packed // 2)
        if cache.dim() != ndim:
            expected = f"{ndim}" + (f" (or {ndim - 1}, packed)" if self.packed_kv else "")
            raise KVLayoutError(f"kv cache: layout {self} ({' '.join(self.dims)}) expects {expected} dims, "
                                f"got shape {tuple(cache.shape)}")
        if "2" in self.dims and cache.shape[self.dims.index("2")] != 2:
            raise KVLayoutError(f"kv cache: the '2' dim of layout {self} has size "
                                f"{cache.shape[self.dims.index('2')]} in shape {tuple(cache.shape)}, expected 2")
        dims = list(self.dims)
        for absent in ("2", "H"):
            if absent not in dims:
                cache = cache.unsqueeze(-1)
                dims.append(absent)
        order = [d for d in DIMS if d in dims]
        return cache.permute([dims.index(d) for d in order])
