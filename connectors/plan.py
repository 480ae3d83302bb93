"""What the scheduler half tells the worker half each step (`StepPlan`): per request, the chunks to load and
to save, named by their hashes, and the slots their tokens move from or to.

A slot is one token's place in vLLM's paged cache: `block_id * block_size + offset`. Token ranges are
[start, end) positions in the prompt. The worker never decides anything: it moves the bytes it is told to.
Nothing here imports vLLM (connectors/metadata.py wraps a plan in vLLM's metadata class), so the load and
save paths run, and are measured (bench.transfer), without it.
"""

from dataclasses import dataclass, field

import numpy as np
import torch


def slots_for(block_ids, block_size: int, start: int, end: int) -> torch.Tensor:
    """Slots of prompt positions [start, end) given the request's blocks in position order."""
    pos = np.arange(start, end, dtype=np.int64)
    blocks = np.asarray(block_ids, dtype=np.int64)[pos // block_size]
    return torch.from_numpy(blocks * block_size + pos % block_size)


@dataclass
class LoadSpec:
    """Load positions [start, end): the chunks `hashes` cover [first, ...) (first = start rounded down to a
    chunk); the part from `start` goes into `slots` (one per position in [start, end)). background: run it
    off the forward pass and report the request through `get_finished` (vLLM keeps it waiting)."""

    req_id: str
    hashes: list[bytes]  # prefix-mode chunk hashes of the chunks covering [first, end)
    first: int  # position of the first chunk's first token
    start: int
    end: int
    slots: torch.Tensor  # int64 [end - start]
    background: bool = False


@dataclass
class SaveSpec:
    """Store the chunks `hashes` (whole chunks, in order), whose KV sits in `slots` (one per token)."""

    req_id: str
    hashes: list[bytes]
    slots: torch.Tensor  # int64 [len(hashes) * chunk_size]


@dataclass
class SegmentLoadSpec:
    """Load positions [start, end) from cached segment chunks (after the request's LoadSpec, if any): chunk
    i holds positions [chunks[i][1], chunks[i][1] + chunks[i][2]) of this prompt; K is re-rotated from where
    each chunk was computed to these positions."""

    req_id: str
    chunks: list[tuple]  # (segment chunk hash, start position in this prompt, tokens), consecutive, in order
    start: int
    end: int
    slots: torch.Tensor  # int64 [end - start]
    background: bool = False


@dataclass
class SegmentSaveSpec:
    """Store segment chunks this prompt computed: (chunk hash, start position, tokens) with their slots."""

    req_id: str
    chunks: list[tuple]
    slots: list[torch.Tensor]  # per chunk, int64 [tokens]


@dataclass
class PinSpec:
    """Pin (for hot_cache_ttl) or unpin the chunks `hashes` of a request's prompt, after this step's saves."""

    req_id: str
    hashes: list[bytes]
    on: bool


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    segment_loads: list[SegmentLoadSpec] = field(default_factory=list)
    segment_saves: list[SegmentSaveSpec] = field(default_factory=list)
    # Requests whose failed load the scheduler has seen (and re-planned the saves of): the worker may save
    # their chunks again. Until then it saves none of them, even with async scheduling's step in flight.
    failures_seen: set[str] = field(default_factory=set)
    pins: list[PinSpec] = field(default_factory=list)
    idle: bool = False  # the step computes nothing (only background loads are in flight, or requests wait)
    waiting: bool = False  # some request waits for chunks another owner computes
