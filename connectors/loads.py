"""Loads: cached chunks into vLLM's paged KV cache, for the slots the scheduler planned.

A request's load (`LoadJob`: its prefix chunks, then its segment chunks) runs in three phases:
1. open: the chunks are held (`CacheEngine.open_chunks`), the leading run the cache still has (evicted or
   corrupt since the lookup: the run is shorter). Everything after the first missing position fails.
2. move: layer group by layer group, every held chunk's part goes into its slots (a chunk held on the CPU is
   copied to the cache's device first; a segment chunk's K is re-rotated to its new positions), and the
   positions that failed are zeroed, so no block vLLM was promised ever keeps stale bytes. On CUDA this is
   enqueued on the load stream; `on_layers(hi)` is told after each group (layer-wise pipelining).
3. finish: once the copies are done (on CUDA: the load stream's event), the held chunks are closed.
The outcome is how far the load got (`upto`) and the blocks that failed, which vLLM recomputes.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels import scatter_kv

from .device_streams import Streams
from .plan import LoadSpec, SegmentLoadSpec
from .segment_io import rerotate

log = logging.getLogger(__name__)


@dataclass
class LoadJob:
    """One request's loads of one step: its prefix part and/or its segment part (in position order)."""

    req_id: str
    prefix: LoadSpec | None = None
    segments: SegmentLoadSpec | None = None

    @property
    def start(self) -> int:
        return (self.prefix or self.segments).start

    @property
    def end(self) -> int:
        return (self.segments or self.prefix).end

    @property
    def background(self) -> bool:
        return (self.prefix or self.segments).background


@dataclass
class LoadOutcome:
    req_id: str
    upto: int  # positions [start, upto) loaded; [upto, end) failed (zeroed, their blocks recomputed)
    end: int
    failed_blocks: set[int] = field(default_factory=set)


@dataclass
class _Piece:
    """Positions [lo, hi) of the prompt from `src` (a held chunk, or None: zeros), into `slots`."""

    src: torch.Tensor | None
    a: int  # token offset of lo inside src
    lo: int
    hi: int
    slots: torch.Tensor
    moved_from: int | None = None  # segment chunks: where src's token `a` was computed (K is re-rotated)


class Loader:
    def __init__(self, engine, caches, layout, *, block_size: int, streams: Streams, mover=None, rope=None,
                 rerotate_segments: bool = True):
        self.engine, self.caches, self.layout = engine, caches, layout
        self.block_size, self.streams = block_size, streams
        self.mover, self.rope, self.rerotate = mover, rope, rerotate_segments
        self.num_layers = engine.spec.num_layers
        self.device = engine.device

    # -- phase 1 ------------------------------------------------------------------------------------------

    def open(self, job: LoadJob) -> tuple[list[_Piece], list, int]:
        """(pieces to move, held chunks to close after, how far the cached run reaches)."""
        cs = self.engine.config.chunk_size
        pieces, held, upto = [], [], job.start
        try:
            spec = job.prefix
            if spec is not None:
                got = self.engine.open_chunks(keys=self.engine.keys_of(spec.hashes))
                held += got
                for i, h in enumerate(got):
                    first = spec.first + i * cs
                    lo, hi = max(spec.start, first), min(spec.end, first + cs)
                    if lo < hi:
                        pieces.append(_Piece(h.tensor, lo - first, lo, hi, spec.slots[lo - spec.start:hi - spec.start]))
                upto = max(spec.start, min(spec.end, spec.first + len(got) * cs))
            seg = job.segments
            if seg is not None and (job.prefix is None or upto >= job.prefix.end):
                got = self.engine.open_chunks(keys=self.engine.keys_of([h for h, _, _ in seg.chunks]))
                held += got
                for h, (_, first, length) in zip(got, seg.chunks):
                    if h.position is None:  # a segment chunk must say where it was computed
                        break
                    lo, hi = max(seg.start, first), min(seg.end, first + length)
                    pieces.append(_Piece(h.tensor, lo - first, lo, hi, seg.slots[lo - seg.start:hi - seg.start],
                                         moved_from=h.position + lo - first))
                    upto = hi
        except Exception as e:  # a tier fault is a miss, never an error for the request
            log.warning("lmcache: load for request %s failed: %r", job.req_id, e)
        if upto < job.end:  # the rest is zeroed: vLLM recomputes it
            pieces.append(_Piece(None, 0, upto, job.end, self._slots(job, upto, job.end)))
        for p in pieces:  # once per piece, not once per layer group (a pageable copy would sync the stream)
            p.slots = p.slots.to(self.device, non_blocking=True)
        return pieces, held, upto

    @staticmethod
    def _slots(job: LoadJob, lo: int, hi: int) -> torch.Tensor:
        """The slots of positions [lo, hi) of the job (its prefix and segment parts together)."""
        parts = []
        for spec in (job.prefix, job.segments):
            if spec is not None and spec.start < hi and lo < spec.end:
                a, b = max(lo, spec.start), min(hi, spec.end)
                parts.append(spec.slots[a - spec.start:b - spec.start])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # -- phase 2 ------------------------------------------------------------------------------------------

    def move(self, pieces: list[_Piece], groups: list[tuple[int, int]],
             on_layers: Callable[[int], None] | None = None) -> None:
        """Every piece, layer group by layer group ([lo, hi) layer ranges covering all layers, in order)."""
        for l0, l1 in groups:
            for p in pieces:
                self._move_piece(p, l0, l1)
            if on_layers is not None:
                on_layers(l1)

    def _move_piece(self, p: _Piece, l0: int, l1: int) -> None:
        slots = p.slots  # on the cache's device already (`open`)
        n = p.hi - p.lo
        if p.src is None:
            shape = self.engine.spec.chunk_shape(n)
            kv = torch.zeros((l1 - l0, *shape[1:]), dtype=getattr(torch, self.engine.spec.dtype), device=self.device)
        else:
            kv = p.src[l0:l1, :, p.a:p.a + n]
            copy = p.moved_from is not None and self.rerotate and p.moved_from != p.lo
            kv = kv.to(self.device, non_blocking=True, copy=copy)
            if copy:
                rerotate(kv, p.moved_from, p.lo, self.rope)
        caches = self.caches if self.layout.has_layers else self.caches[l0:l1]
        if self.mover is not None and (p.src is None or p.moved_from is not None):
            self.mover.scatter(kv, slots, first_layer=l0)  # any positions (segments, and failures after them)
        else:
            scatter_kv(kv, caches, slots, self.layout, validate=False)

    # -- phase 3 ------------------------------------------------------------------------------------------

    def outcome(self, job: LoadJob, upto: int) -> LoadOutcome:
        failed = set()
        if upto < job.end:
            bad = self._slots(job, upto, job.end)
            failed = set((bad // self.block_size).unique().tolist())
            log.warning("lmcache: request %s: loaded %d of %d tokens; vLLM recomputes the rest", job.req_id,
                        upto - job.start, job.end - job.start)
        return LoadOutcome(job.req_id, upto, job.end, failed)

    def run(self, jobs: list[LoadJob], groups: list[tuple[int, int]],
            on_layers: Callable[[int], None] | None = None) -> tuple[list[LoadOutcome], list, object]:
        """Phases 1 and 2 for every job on the current thread, all jobs layer group by layer group, copies
        enqueued on the load stream: (outcomes, held chunks to close once `event` fired, event)."""
        with self.streams.on(self.streams.load):
            opened = [self.open(job) for job in jobs]
            self.move([p for pieces, _, _ in opened for p in pieces], groups, on_layers)
            event = self.streams.record(self.streams.load)
        outcomes = [self.outcome(job, upto) for job, (_, _, upto) in zip(jobs, opened)]
        return outcomes, [h for _, held, _ in opened for h in held], event

    def all_layers(self) -> list[tuple[int, int]]:
        return [(0, self.num_layers)]

    def each_layer(self) -> list[tuple[int, int]]:
        return [(i, i + 1) for i in range(self.num_layers)] if not self.layout.has_layers else self.all_layers()


def close_all(held) -> None:
    for h in held:
        h.close()
