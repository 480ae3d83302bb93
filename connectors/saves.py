"""Saves: chunks whose tokens the forward pass just computed, out of vLLM's paged KV cache into the cache.

Per step, every planned chunk's slots are gathered (`gather_kv`, all layers in one call, or layer by layer
from `save_kv_layer` as the forward pass writes them) into one staging tensor, then handed to the cache
engine on the save thread, off the forward thread. On CUDA the gathers run on the save stream after the
forward stream's writes (an event), the forward stream waits for the gathers before it can reuse the
blocks (an event, never the host), and the save thread waits on the host for the gathers before storing.
On the CPU the same code runs with the stream calls as no-ops. At most MAX_PENDING steps' saves are in
flight; a step that finds more waits for the oldest (back-pressure instead of unbounded memory).
"""

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kernels import gather_kv

from .device_streams import Streams
from .plan import StepPlan
from .segment_io import padded

log = logging.getLogger(__name__)

MAX_PENDING = 2  # steps whose saves may be in flight at once; each holds its staging tensor


class StepSaves:
    """One step's saves: the specs, their concatenated slots, the staging tensor (a view of a pooled
    buffer), the layers gathered."""

    def __init__(self, specs, segment_specs, slots: torch.Tensor | None, buffer: torch.Tensor | None,
                 staging: torch.Tensor | None):
        self.specs, self.segment_specs = specs, segment_specs
        self.slots, self.buffer, self.staging = slots, buffer, staging
        self.gathered = 0  # layers [0, gathered) are in staging


class Saver:
    def __init__(self, engine, caches, layout, *, streams: Streams, mover=None):
        self.engine, self.caches, self.layout, self.streams, self.mover = engine, caches, layout, streams, mover
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-save")
        self._pending: deque[Future] = deque()
        self._hashes: dict[Future, frozenset[bytes]] = {}  # the chunks each pending save stores
        self._buffers: list[torch.Tensor] = []  # flat staging buffers, reused
        self._buffer_of: dict[Future, torch.Tensor] = {}  # the buffer each pending save reads

    def begin(self, meta: StepPlan, skip: set[str]) -> StepSaves | None:
        """The step's saves, minus the requests in `skip`; None when there is nothing to save."""
        specs = [s for s in meta.saves if s.req_id not in skip]
        segment_specs = [s for s in meta.segment_saves if s.req_id not in skip]
        if not specs and not segment_specs:
            return None
        slots = buffer = staging = None
        if specs:
            slots = torch.cat([s.slots for s in specs]).to(self.engine.device, non_blocking=True)
            buffer, staging = self._staging(slots.numel())
        return StepSaves(specs, segment_specs, slots, buffer, staging)

    def _staging(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A staging tensor for `tokens` tokens from a pool of MAX_PENDING + 1 buffers, reused step after step
        (a fresh 34 MB CPU buffer per step cost 22 ms of page faults in bench.transfer; on CUDA the caching
        allocator would reuse memory anyway). A buffer is free again once its step's store is done: at most
        MAX_PENDING are in flight, so one of them always is."""
        busy = {id(b) for b in list(self._buffer_of.values())}  # read by a store in flight
        buf = next((b for b in self._buffers if id(b) not in busy), None)
        shape = self.engine.spec.chunk_shape(tokens)
        need = torch.Size(shape).numel()
        if buf is None or buf.numel() < need:
            if buf is not None:
                self._buffers.remove(buf)
            buf = torch.empty(max(need, 2 * (buf.numel() if buf is not None else 0)),
                              dtype=getattr(torch, self.engine.spec.dtype), device=self.engine.device)
            self._buffers.append(buf)
        return buf, buf[:need].view(shape)

    def gather_layers(self, step: StepSaves, upto: int) -> None:
        """Gather layers [step.gathered, upto) of every planned slot (the forward pass wrote them)."""
        if step.staging is None or upto <= step.gathered:
            return
        lo, step.gathered = step.gathered, upto
        written = self.streams.record()  # the forward stream's writes so far
        with self.streams.on(self.streams.save):
            self.streams.wait(written, self.streams.save)
            if self.layout.has_layers:  # one tensor holds every layer: gathered in one call at the end
                if upto == self.engine.spec.num_layers:
                    gather_kv(self.caches, step.slots, self.layout, out=step.staging, validate=False)
            else:
                gather_kv(self.caches[lo:upto], step.slots, self.layout, out=step.staging[lo:upto], validate=False)

    def finish(self, step: StepSaves) -> None:
        """After the forward pass: gather what is left, then store everything on the save thread."""
        self.gather_layers(step, self.engine.spec.num_layers)
        segments = []
        with self.streams.on(self.streams.save):
            for spec in step.segment_specs:  # per-token moves at any position (segment reuse)
                cs = self.engine.config.chunk_size
                segments.append([(h, padded(self.mover.gather(slots.to(self.engine.device)), cs), first)
                                 for (h, first, _), slots in zip(spec.chunks, spec.slots)])
            gathered = self.streams.record(self.streams.save)
        self.streams.wait(gathered)  # the forward stream reuses no saved block before it was read
        while len(self._pending) >= MAX_PENDING:
            self._pending.popleft().exception()
        future = self._pool.submit(self._store, step, segments, gathered)
        if step.buffer is not None:
            self._buffer_of[future] = step.buffer
            future.add_done_callback(lambda f: self._buffer_of.pop(f, None))
        self._hashes[future] = frozenset(h for spec in step.specs for h in spec.hashes) | frozenset(
            h for spec in step.segment_specs for h, _, _ in spec.chunks)
        future.add_done_callback(lambda f: self._hashes.pop(f, None))
        self._pending.append(future)

    def _store(self, step: StepSaves, segments, gathered) -> None:
        self.streams.synchronize(gathered)
        cs, off = self.engine.config.chunk_size, 0
        for spec in step.specs:
            n = len(spec.hashes) * cs
            try:
                self.engine.store(None, step.staging[:, :, off:off + n], keys=self.engine.keys_of(spec.hashes))
            except Exception as e:  # a full or failing tier loses a cache entry, not the request
                log.warning("lmcache: store for request %s failed: %r", spec.req_id, e)
            off += n
        for spec, items in zip(step.segment_specs, segments):
            try:
                keys = self.engine.keys_of([h for h, _, _ in items])
                self.engine.store_positioned([(key, kv, first) for key, (_, kv, first) in zip(keys, items)])
            except Exception as e:
                log.warning("lmcache: segment store for request %s failed: %r", spec.req_id, e)

    def then(self, fn, *args) -> None:
        """Run fn(*args) on the save thread after every save handed over so far."""
        future = self._pool.submit(fn, *args)
        future.add_done_callback(lambda f: f.exception() and log.warning("lmcache: %r failed: %r", fn, f.exception()))

    def wait_for(self, hashes) -> None:
        """Return once no save in flight stores any of `hashes` (a lookup then sees what this worker's
        earlier steps computed: read-your-writes for the scheduler)."""
        wanted = set(hashes)
        for future, stored in list(self._hashes.items()):
            if stored & wanted:
                future.exception()

    def flush(self) -> None:
        """Wait until every save handed over so far is in the engine."""
        while self._pending:
            self._pending.popleft().exception()

    def close(self) -> None:
        self.flush()
        self._pool.shutdown(wait=True)
