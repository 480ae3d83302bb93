"""What the scheduler half tells the worker half each step: per request, the slots to load and to save.

A slot is one token's place in vLLM's paged cache: `block_id * block_size + offset`. Token ranges are
[start, end) positions in the prompt. The worker never decides anything: it moves the bytes it is told to.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


def slots_for(block_ids, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of prompt positions [start, end) given the request's blocks in position order."""
    pos = np.arange(start, end, dtype=np.int64)
    blocks = np.asarray(block_ids, dtype=np.int64)[pos // block_size]
    return torch.from_numpy(blocks * block_size + pos % block_size)


@dataclass
class LoadSpec:
    """Load positions [start, end) of `token_ids`: retrieve the chunks covering [0, end), scatter the part
    from `start` into `slots` (one per position in [start, end))."""

    req_id: str
    token_ids: list[int]  # the prompt's leading whole chunks covering `end`
    namespace: str | None
    start: int
    end: int
    slots: torch.Tensor  # int64 [end - start]


@dataclass
class SaveSpec:
    """Store the chunks of `token_ids` (whole chunks, from position 0), whose KV sits in `slots`."""

    req_id: str
    token_ids: list[int]
    namespace: str | None
    slots: torch.Tensor  # int64 [len(token_ids)]
    first_new_chunk: int  # chunks before it were stored in an earlier step: gathered and stored from here


@dataclass
class SegmentLoadSpec:
    """Load positions [start, end) from cached segment chunks (after the request's LoadSpec, if any): chunk
    i holds positions [chunks[i][1], chunks[i][1] + chunks[i][2]) of this prompt; K is re-rotated from where
    each chunk was computed to these positions."""

    req_id: str
    chunks: list[tuple]  # (ChunkKey, start position in this prompt, tokens), consecutive, in order
    start: int
    end: int
    slots: torch.Tensor  # int64 [end - start]


@dataclass
class SegmentSaveSpec:
    """Store segment chunks this prompt computed: (ChunkKey, start position, tokens) with their slots."""

    req_id: str
    chunks: list[tuple]
    slots: list[torch.Tensor]  # per chunk, int64 [tokens]


@dataclass
class LMCacheCoreMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    segment_loads: list[SegmentLoadSpec] = field(default_factory=list)
    segment_saves: list[SegmentSaveSpec] = field(default_factory=list)
    # Requests whose failed load the scheduler has seen (and re-planned the saves of): the worker may save
    # their chunks again. Until then it saves none of them, even with async scheduling's step in flight.
    failures_seen: set[str] = field(default_factory=set)
