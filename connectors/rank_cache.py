"""One worker rank's cache: its engine, its lookup server, and the loads and saves of each step.

No vLLM in here (connectors/worker.py adapts vLLM's worker hooks to it), so it runs, and is tested and
measured, in processes that only have torch: several ranks in separate processes talking to a scheduler
through the lookup channel (tests), or the load/store pipeline alone (bench.transfer).

Each step:
- `start_loads(plan)`: background loads (chunks on disk or in Redis) go to the load thread and their requests
  are reported finished by `finished()` once done; synchronous loads (every chunk in L1/L2) run now, before
  the forward pass, or, layer-wise, on the load thread while the forward pass runs (`wait_for_layers(n)`
  returns once layers [0, n) are in place). A load that comes back short zeroes what it could not fill and
  reports the blocks: the engine recomputes them, and that request's saves are skipped until the scheduler
  has seen the failure and planned them again (`plan.failures_seen`).
- `save_layers(plan, n)` (layer-wise) / `finish_saves(plan)`: the planned chunks are gathered and handed to
  the engine on the save thread.
"""

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from lmcache_core import CacheEngine

from .device_streams import Streams
from .loads import LoadJob, LoadOutcome, Loader, close_all
from .lookup import LookupServer
from .plan import StepPlan
from .saves import Saver

log = logging.getLogger(__name__)

TIER_GAUGES = ("used_bytes", "capacity_bytes", "entries", "pinned_bytes")
# A step with nothing to compute while loads run or requests wait for another owner waits this long for a load
# to finish: vLLM steps again at once otherwise, spinning three processes on cores that others need.
IDLE_WAIT_S = 0.01


class RankCache:
    def __init__(self, engine: CacheEngine, caches, layout, *, block_size: int, socket: str | None, lead: bool,
                 layerwise: bool, mover=None, rope=None, rerotate_segments: bool = True):
        """engine: this rank's (closed by `close`); caches/layout: vLLM's paged KV cache as the kernels take it;
        socket: where to answer lookups (None: nobody asks, e.g. bench.transfer); lead: this rank makes the
        single-flight claims (one per instance)."""
        self.engine, self.lead, self.layerwise = engine, lead, layerwise
        self.streams = Streams(engine.device)
        self.loader = Loader(engine, caches, layout, block_size=block_size, streams=self.streams, mover=mover,
                             rope=rope, rerotate_segments=rerotate_segments)
        self.saver = Saver(engine, caches, layout, streams=self.streams, mover=mover)
        self._loads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-load")
        self._releases = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-release")
        self._lock = threading.Condition()
        self._background: dict[str, Future] = {}
        self._done: list[LoadOutcome] = []  # background loads finished, not yet reported
        self._outcomes: list[LoadOutcome] = []  # this step's, taken by `take_outcomes` after the forward
        self._layerwise: _LayerwiseLoad | None = None
        self._saves = None  # this step's StepSaves once layer-wise saving began (False: nothing to save)
        self._no_saves: set[str] = set()  # failed loads the scheduler has not re-planned yet
        self._last_snapshot = 0.0
        self.server = LookupServer(socket, self.answer) if socket else None  # last: it answers with all above

    # -- the scheduler's questions (on the lookup server's thread) ----------------------------------------

    def answer(self, op: str, header: dict, hashes: list[bytes]) -> dict:
        engine = self.engine
        keys = engine.keys_of(hashes)
        if op in ("ask", "contains"):
            self.saver.wait_for(hashes)  # chunks this rank is storing right now count as stored
        if op == "ask":
            owner = header.get("owner") if self.lead else None
            probe = engine.ask(keys, owner=owner, prefetch=bool(header.get("prefetch")))
            return {"tiers": list(probe.tiers), "claim": probe.claim.value if probe.claim is not None else None}
        if op == "contains":
            names = [t.name for t in engine.tiers.tiers]
            return {"tiers": [None if t is None else names[t] for t in engine.tiers.locate(keys)]}
        if op == "release":
            if self.lead:
                engine.release(None, owner=header["owner"], keys=keys)
            return {}
        if op == "reset":
            engine.clear(memory_only=True)
            return {"ok": True}
        raise ValueError(f"op: expected ask, contains, release or reset, got {op!r}")

    # -- loads --------------------------------------------------------------------------------------------

    def start_loads(self, plan: StepPlan) -> None:
        jobs: dict[str, LoadJob] = {}
        for spec in plan.loads:
            jobs.setdefault(spec.req_id, LoadJob(spec.req_id)).prefix = spec
        for spec in plan.segment_loads:
            jobs.setdefault(spec.req_id, LoadJob(spec.req_id)).segments = spec
        now = [job for job in jobs.values() if not job.background]
        for job in jobs.values():
            if job.background:
                with self._lock:
                    self._background[job.req_id] = self._loads.submit(self._load_in_background, job)
        if not now:
            return
        if self.layerwise:
            self._layerwise = _LayerwiseLoad(self, now)
            return
        outcomes, held, event = self.loader.run(now, self.loader.all_layers())
        self.streams.wait(event)  # the forward pass reads the blocks after the copies, never waits on the host
        self._after(held, event)
        self._outcomes += outcomes

    def _after(self, held, event) -> None:
        """Close held chunks once the copies from them are done (on CUDA, off the forward thread)."""
        if event is None:
            close_all(held)
        else:
            self._releases.submit(lambda: (self.streams.synchronize(event), close_all(held)))

    def _load_in_background(self, job: LoadJob) -> None:
        try:
            outcomes, held, event = self.loader.run([job], self.loader.all_layers())
            self.streams.synchronize(event)
            close_all(held)
        except Exception as e:  # never leave the request waiting: report it failed from its start
            log.warning("lmcache: background load for request %s failed: %r", job.req_id, e)
            outcomes = [LoadOutcome(job.req_id, job.start, job.end, set())]
        with self._lock:
            self._done += outcomes
            self._lock.notify_all()

    def loads_in_flight(self) -> int:
        """Background loads started and not yet reported finished."""
        with self._lock:
            return len(self._background)

    def wait_for_layers(self, upto: int) -> None:
        if self._layerwise is not None:
            self._layerwise.wait(upto)

    def _finish_layerwise(self) -> None:
        if self._layerwise is not None:
            self._outcomes += self._layerwise.join()
            self._layerwise = None

    # -- saves --------------------------------------------------------------------------------------------

    def save_layers(self, plan: StepPlan, upto: int) -> None:
        """Layer-wise: layers [0, upto) of this step's saves are written; gather them now."""
        if self._saves is None:
            self._saves = self.saver.begin(plan, self._no_saves) or False
        if self._saves:
            self.saver.gather_layers(self._saves, upto)

    def finish_saves(self, plan: StepPlan) -> None:
        self._finish_layerwise()
        failed = {o.req_id for o in self._outcomes if o.upto < o.end}
        self._no_saves = (self._no_saves - (plan.failures_seen - failed)) | failed
        step = self._saves if self._saves is not None else self.saver.begin(plan, self._no_saves)
        self._saves = None
        if step:
            self.saver.finish(step)
        if plan.pins:  # after the saves above (one save thread, in order): a pin finds the chunks it names
            self.saver.then(self._pin, list(plan.pins))

    def _pin(self, pins) -> None:
        engine = self.engine
        for pin in pins:
            keys = engine.keys_of(pin.hashes)
            if pin.on:
                engine.pin(None, keys=keys, ttl=engine.config.hot_cache_ttl)
            else:
                engine.unpin(None, keys=keys)

    # -- step results -------------------------------------------------------------------------------------

    def finished(self, plan: StepPlan | None) -> set[str]:
        """Requests whose background load finished since the last step (their outcomes join this step's)."""
        self._finish_layerwise()
        with self._lock:
            if plan is not None and plan.idle and (self._background or plan.waiting) and not self._done:
                self._lock.wait(IDLE_WAIT_S)
            done, self._done = self._done, []
            for o in done:
                self._background.pop(o.req_id, None)
        self._no_saves |= {o.req_id for o in done if o.upto < o.end}
        self._outcomes += done
        return {o.req_id for o in done}

    def failed_blocks(self) -> set[int]:
        return set().union(*(o.failed_blocks for o in self._outcomes))

    def take_outcomes(self) -> list[LoadOutcome]:
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    def tier_snapshot(self) -> dict | None:
        """{"<pp>/<tp>": {tier: usage gauges + cumulative fault counts}} at most once a second, else None."""
        now = time.monotonic()
        if now - self._last_snapshot < 1.0:
            return None
        self._last_snapshot = now
        spec, cfg = self.engine.spec, self.engine.config
        tiers = {name: {**{g: s[g] for g in TIER_GAUGES}, "corrupt": s["corrupt"], "errors": dict(s["errors"])}
                 for name, s in self.engine.stats().items()}
        if cfg.local_cache_dir and "L3" in tiers:  # the filesystem under the disk tier (alert: over 80% full)
            try:
                fs = os.statvfs(cfg.local_cache_dir)
                tiers["L3"].update(fs_size_bytes=fs.f_blocks * fs.f_frsize, fs_avail_bytes=fs.f_bavail * fs.f_frsize)
            except OSError:
                pass
        return {f"{spec.pp_rank}/{spec.tp_rank}": tiers}

    def close(self) -> None:
        """Stop answering lookups, finish every load and save in flight, write back and close the engine."""
        if self.server is not None:
            self.server.close()
        self._finish_layerwise()
        self.saver.close()
        self._loads.shutdown(wait=True)
        self._releases.shutdown(wait=True)
        self.engine.close()


class _LayerwiseLoad:
    """One step's synchronous loads on the load thread, layer by layer: `wait(n)` returns once layers
    [0, n) are in vLLM's blocks (CPU) or enqueued with an event the forward stream now waits on (CUDA)."""

    def __init__(self, rank: RankCache, jobs: list[LoadJob]):
        self.rank, self.jobs = rank, jobs
        self.ready = 0  # layers [0, ready) are loaded (or enqueued)
        self.events: dict[int, object] = {}
        self.cond = threading.Condition()
        self.future = rank._loads.submit(self._run)

    def _layers_done(self, upto: int) -> None:
        event = self.rank.streams.record(self.rank.streams.load)
        with self.cond:
            self.ready, self.events[upto] = upto, event
            self.cond.notify_all()

    def _run(self):
        loader = self.rank.loader
        try:
            return loader.run(self.jobs, loader.each_layer(), on_layers=self._layers_done)
        finally:
            with self.cond:
                self.ready = loader.num_layers
                self.cond.notify_all()

    def wait(self, upto: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.ready >= upto)
            event = self.events.get(self.ready)
        self.rank.streams.wait(event)

    def join(self) -> list[LoadOutcome]:
        outcomes, held, event = self.future.result()
        self.rank.streams.wait(event)
        self.rank._after(held, event)
        return outcomes
