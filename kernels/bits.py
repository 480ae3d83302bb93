"""Elements seen as same-size integers: how the kernels move bytes of every dtype exactly.

A float moved as a float can be canonicalized on the way (NaN payloads, float8 on some paths); moved as the
integer of its size it cannot. Every byte mover (gather/scatter, the byte-plane shuffle, the codecs' reads
of the staging and the cache) views its tensors through this one table.
"""

import torch

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def as_int_bits(t: torch.Tensor) -> torch.Tensor:
    """`t` viewed (no copy) as the integer dtype of its element size: 1-, 2- or 4-byte elements."""
    return t.view(INT_OF_SIZE[t.element_size()])
