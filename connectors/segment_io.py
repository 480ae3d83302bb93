"""Worker side of segment reuse: per-token KV moves for any layout, and the re-rotation of loaded segments.

Segments land at arbitrary positions, so their moves are per token, not per block. vLLM's CPU backend lays
a block's bytes out privately per ISA (`connectors.cpu_block_probe`): there, tokens move through the in-block
layout probed from vLLM's own `cpu_attn_reshape_and_cache` at start-up (`cpu_blocks.gather_tokens` /
`scatter_tokens`, which write byte for byte what that op writes: tested); every other layout moves tokens
with `scatter_kv` / `gather_kv`.
"""

import torch

from kernels import gather_kv, rope_shift, scatter_kv

from .cpu_block_probe import attn_isa, probe_block_layout
from .cpu_blocks import gather_tokens, scatter_tokens
from .segments import RopeParams


class TokenMover:
    """Canonical KV `[L, 2, N, H, D]` to and from any slots of the paged caches the worker registered."""

    def __init__(self, caches, layout, *, cpu_blocks: bool, block_size: int):
        self.caches, self.layout = caches, layout
        self.cpu = None
        if cpu_blocks:  # vllm_cpu: per-layer (NB, H, BS, 2D) tensors in the ISA's private in-block order
            first = caches[0]
            heads, head_dim = first.shape[1], first.shape[3] // 2
            isa = attn_isa(first.dtype, block_size, head_dim)
            self.cpu = (isa, probe_block_layout(isa, first.dtype, block_size, heads, head_dim))

    def scatter(self, kv: torch.Tensor, slots: torch.Tensor, *, first_layer: int = 0) -> None:
        """kv `[L', 2, N, H, D]`: layers [first_layer, first_layer + L') into `slots`."""
        if self.cpu is None:
            caches = self.caches if self.layout.has_layers else self.caches[first_layer:first_layer + kv.shape[0]]
            scatter_kv(kv, caches, slots, self.layout, validate=False)
            return
        scatter_tokens(kv, self.caches[first_layer:first_layer + kv.shape[0]], slots, self.cpu[1])

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        if self.cpu is None:
            return gather_kv(self.caches, slots, self.layout, validate=False)
        return gather_tokens(self.caches, slots, self.cpu[1])


def rerotate(kv: torch.Tensor, stored_at: int, new_at: int, rope: RopeParams) -> torch.Tensor:
    """K of staging `kv` `[L, 2, N, H, D]` (in place) moved from positions stored_at.. to new_at..."""
    if stored_at != new_at:
        n = kv.shape[2]
        rope_shift(kv, torch.arange(stored_at, stored_at + n), torch.arange(new_at, new_at + n),
                   **rope.shift_kwargs())
    return kv


def padded(kv: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """A segment's tail `[L, 2, n, H, D]` padded with zeros to a whole chunk (the stored chunk shape)."""
    n = kv.shape[2]
    if n == chunk_size:
        return kv
    out = kv.new_zeros((*kv.shape[:2], chunk_size, *kv.shape[3:]))
    out[:, :, :n] = kv
    return out

