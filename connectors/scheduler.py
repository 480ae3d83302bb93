"""The scheduler half: answers "how many prompt tokens can be loaded" and plans each step's loads and saves.

It holds no cache engine, no memory and does no tier I/O: the workers own the tiers, and every question goes
to them over the lookup channel (connectors/lookup.py), all ranks at once; a chunk counts only when every
rank holds it. Per request it keeps the prompt (it never changes), its chunk hashes (hashed once, on the first
ask), the namespace, the single-flight wait, the load vLLM accepted, and how many leading chunks are known
stored. What it sends each step names the chunks by hash and the slots of the tokens that move, never the
whole prompt again.

Timeline per request: `ask` (first time: statistics and prefetch on the workers; every time: the claim) ->
`update_state_after_alloc` (vLLM accepted `n` external tokens) -> `build_connector_meta` (the load once:
synchronous when every chunk is in the workers' memory tiers, else in the background with the request in
WAITING_FOR_REMOTE_KVS; each chunk whose tokens are all computed by the end of the step, once) ->
`update_connector_output` (loads done or failed) -> `request_finished` (release claims, forget the request).
"""

import logging
import time
from dataclasses import dataclass

from kernels import chunk_hashes
from lmcache_core.keys import chunk_salt
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .lookup import LookupClient, Question, socket_path
from .metadata import LMCacheCoreMetadata
from .plan import LoadSpec, PinSpec, SaveSpec, SegmentLoadSpec, SegmentSaveSpec, slots_for
from .segments import SegmentError, SegmentPlan, parse_prompt, parse_separator, request_spans
from .settings import ConnectorSettings
from .vllm_config import attention_spec, configured_layout, parallel_ranks
from .stats import LMCacheCoreStats

log = logging.getLogger(__name__)

MEMORY_TIERS = ("L1", "L2")
# How long one ask may hold up the scheduler's thread: workers answer in ~1 ms (0.9 ms measured under the
# server); a worker starved of CPU by a long prefill beside it answers later, and the request asks again at the
# next step (up to lookup_timeout) while the scheduler goes on with the others.
ASK_WAIT_S = 0.02
# A request waiting for another owner's chunks asks again at most this often (each ask is a round trip to
# the workers and to Redis's locks). Re-asking at every engine step, 8 waiters on 2 cores asked ~160 times a
# second and starved the owner's prefill on the same host (an 8-request avalanche: 70 s instead of 12 s).
BUSY_RETRY_S = 0.05
# Where vLLM's metrics say our hits came from (vllm:prompt_tokens_cached_by_source). vLLM has no source for
# a remote store: its CacheHitSource documents EXTERNAL_UNSPECIFIED as "uninstrumented connector or remote
# store", so Redis hits are reported there.
_HOST_SOURCES = {"L1": CacheHitSource.HOST, "L2": CacheHitSource.HOST, "L3": CacheHitSource.DISK,
                 "L4": CacheHitSource.EXTERNAL_UNSPECIFIED}
_TIER_ORDER = ("L1", "L2", "L3", "L4")


@dataclass
class _Request:
    prompt: list[int]
    namespace: str | None
    hashes: list[bytes]  # the prompt's prefix-mode chunk hashes
    counted: bool = False  # looked up once for the statistics
    question: Question | None = None  # an ask the workers have not answered yet
    busy_since: float | None = None  # start of the current wait for another owner's chunks
    busy_hit: int = 0  # tokens cached when that wait (re)started: progress restarts the clock
    busy_asks: int = 0  # asks answered busy since then: the next ask is due BUSY_RETRY_S after the last
    waited_out: bool = False  # a wait passed lock_timeout: compute from now on
    computed_at_ask: int = 0  # vLLM's own computed tokens at the last ask
    tiers: tuple[str, ...] = ()  # slowest tier over the ranks of each chunk of the last ask's run
    pending_load: tuple[int, int, bool] | None = None  # [start, end), background: accepted, not yet sent
    loading: tuple[int, int, int, bool] | None = None  # start, prefix end, end, background: sent, not done
    loaded_upto: int | None = None  # a background load: the least position any rank reported loaded so far
    stored_chunks: int = 0  # chunks [0, stored_chunks) are in the cache or on their way there
    segments: SegmentPlan | None = None  # segment reuse: the prompt's segment chunks
    prefix_hit: int = 0  # exact prefix tokens cached, at the last ask
    # Chunks past this many hold KV computed after loaded segments (approximate): never stored as prefix.
    prefix_save_limit: int | None = None
    pin_chunks: int = 0  # leading chunks to pin once stored (the request's own or a configured prompt's)
    unpin_chunks: int = 0  # leading chunks to unpin, at the request's first step


def namespace_of(request) -> str | None:
    """What else makes a prompt's KV differ: the LoRA adapter and the request's cache salt."""
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora={lora.lora_name}:{getattr(lora, 'lora_path', '')}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt={salt}")
    return "\x1f".join(parts) or None


def cacheable(request) -> bool:
    """Token-id prompts only: embeddings and multimodal inputs make KV the token ids do not describe."""
    return (request.prompt_token_ids is not None and getattr(request, "prompt_embeds", None) is None
            and not getattr(request, "mm_features", None))


class WorkerCaches:
    """What the scheduler can ask about the workers' caches (SegmentPlan takes it too)."""

    def __init__(self, client: LookupClient, chunk_size: int, cache_salt: str):
        self.client, self.chunk_size, self._cache_salt = client, chunk_size, cache_salt

    def salt(self, namespace: str | None = None) -> bytes:
        return chunk_salt(self._cache_salt, namespace)

    def ask(self, hashes: list[bytes], owner: str | None, prefetch: bool) -> tuple[tuple[str, ...], str | None]:
        """`start_ask` and its answer, waiting up to the client's timeout (a silent rank: a miss)."""
        question = self.start_ask(hashes, owner, prefetch)
        if not self.client.wait(question, self.client.timeout_s):
            self.client.forget(question)
            self.client.warn_silent(question)
        return self.answer(question)

    def start_ask(self, hashes: list[bytes], owner: str | None, prefetch: bool) -> Question:
        return self.client.send("ask", {"owner": owner, "prefetch": prefetch}, hashes)

    def answer(self, question: Question) -> tuple[tuple[str, ...], str | None]:
        """(slowest tier of each chunk of the run every rank holds, the lead rank's claim); a rank that did
        not answer, or answered with an error: a miss (nothing is loaded, the request computes)."""
        replies = question.replies
        if any(r is None for r in replies):
            return (), None
        run = min(len(r["tiers"]) for r in replies)
        tiers = tuple(max((r["tiers"][i] for r in replies), key=_TIER_ORDER.index) for i in range(run))
        return tiers, replies[0].get("claim")

    def contains(self, hashes: list[bytes]) -> list[str | None]:
        """Per chunk, the slowest tier over the ranks holding it, or None when any rank lacks it."""
        replies = self.client.ask("contains", {}, hashes)
        if any(r is None for r in replies):
            return [None] * len(hashes)
        out = []
        for i in range(len(hashes)):
            where = [r["tiers"][i] for r in replies]
            out.append(None if None in where else max(where, key=_TIER_ORDER.index))
        return out

    def release(self, hashes: list[bytes], owner: str) -> None:
        self.client.ask("release", {"owner": owner}, hashes, wait=False)

    def reset(self) -> bool:
        replies = self.client.ask("reset", {})
        return all(r is not None and r.get("ok") for r in replies)


class SchedulerHalf:
    def __init__(self, vllm_config, kv_cache_config, settings: ConnectorSettings):
        cache = settings.cache
        self.settings = settings
        layout = configured_layout(vllm_config, kv_cache_config)
        self.chunk_size = cache.chunk_size
        self.block_size = attention_spec(kv_cache_config).block_size
        self.whole_blocks = layout.whole_blocks  # prefix loads end on a block boundary (vllm_cpu)
        self.lock_timeout, self.fallback_on_timeout = cache.lock_timeout, cache.fallback_on_timeout
        engine_id = vllm_config.kv_transfer_config.engine_id
        dp = vllm_config.parallel_config.data_parallel_rank
        paths = [socket_path(engine_id, dp, pp, tp) for pp, tp in parallel_ranks(vllm_config)]
        self.client = LookupClient(paths, cache.lookup_timeout)
        self.caches = WorkerCaches(self.client, cache.chunk_size, cache.cache_salt)
        self.segment_reuse = cache.segment_reuse
        self.separator = (parse_separator(cache.segment_separator, _tokenizer(vllm_config))
                          if cache.segment_reuse else None)
        tokenize = _tokenizer(vllm_config)
        # Configured prompts to keep hot: the leading tokens a prompt must start with (a text's last token
        # dropped: at the boundary with what follows, a tokenizer may merge it differently).
        self.pinned = [ids if text.startswith("ids:") else ids[:-1]
                       for text, ids in ((t, parse_prompt(t, tokenize)) for t in cache.pinned_prompts)]
        self.kv_cache_manager = None
        self.stats = LMCacheCoreStats()
        self._reqs: dict[str, _Request] = {}
        self._finishing: dict[str, _Request] = {}  # finished requests whose load has not reported yet
        self._waiting: set[str] = set()  # requests waiting for another owner's chunks
        self._failures_seen: set[str] = set()
        log.info("lmcache: scheduler: chunk %d tokens, asks %d worker(s) over %s (lookup_timeout %.1fs), "
                 "single-flight lock_timeout %.1fs, background loads %s, segment reuse %s", cache.chunk_size,
                 len(paths), paths[0].rsplit("-dp", 1)[0] + "-*.sock", cache.lookup_timeout, cache.lock_timeout,
                 "on" if cache.async_load else "off", "on" if cache.segment_reuse else "off")

    # -- asks ---------------------------------------------------------------------------------------------

    def _state(self, request) -> _Request | None:
        st = self._reqs.get(request.request_id)
        if st is None and cacheable(request):
            prompt, namespace = list(request.prompt_token_ids), namespace_of(request)
            hashes = chunk_hashes(prompt, chunk_size=self.chunk_size, salt=self.caches.salt(namespace))
            st = self._reqs[request.request_id] = _Request(prompt, namespace, hashes)
            if self.segment_reuse:
                st.segments = self._segment_plan(request, st)
            self._pin_plan(request, st)
        return st

    def _pin_plan(self, request, st: _Request) -> None:
        """What this request pins or unpins: `kv_transfer_params` {"pin": true | n tokens} or {"unpin": ...},
        and any configured pinned prompt its prompt starts with (each such request renews that pin)."""
        cs = self.chunk_size
        params = getattr(request, "kv_transfer_params", None) or {}
        for name in ("pin", "unpin"):
            value = params.get(name)
            if value is None or value is False:
                continue
            if value is True or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                n = len(st.hashes) if value is True else min(value // cs, len(st.hashes))
                setattr(st, f"{name}_chunks", n)
            else:
                log.warning('lmcache: request %s: kv_transfer_params["%s"]: expected true or a token count, '
                            "got %r; ignored", request.request_id, name, value)
        for prefix in self.pinned:
            if len(st.prompt) >= len(prefix) and st.prompt[:len(prefix)] == prefix:
                st.pin_chunks = max(st.pin_chunks, len(prefix) // cs)

    def _segment_plan(self, request, st: _Request) -> SegmentPlan | None:
        try:
            spans = request_spans(st.prompt, getattr(request, "kv_transfer_params", None), self.separator)
        except SegmentError as e:  # a bad request parameter costs the request its segment reuse, not more
            log.warning("lmcache: request %s: %s; segment reuse off for it", request.request_id, e)
            return None
        return SegmentPlan.build(self.caches, st.prompt, spans, st.namespace) if spans else None

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        if st is None:
            return 0, False
        cs = self.chunk_size
        if not st.hashes and st.segments is None:  # shorter than a chunk: nothing to ask about
            if not st.counted:
                st.counted = True
                self.stats.add("requests", 1)
            return 0, False
        first = not st.counted
        if st.busy_since is not None and time.monotonic() < st.busy_since + st.busy_asks * BUSY_RETRY_S:
            return None, False  # waiting for another owner: not yet time to ask again
        if st.question is None:
            st.question = self.caches.start_ask(st.hashes, request.request_id,
                                                prefetch=first and self.settings.cache.prefetch_enabled)
        question = st.question
        if not self.client.wait(question, ASK_WAIT_S):
            if time.monotonic() - question.asked_at < self.settings.cache.lookup_timeout:
                return None, False  # a worker is busy: ask again next step instead of stalling the scheduler
            self.client.forget(question)
            self.client.warn_silent(question)
        st.question = None
        self.stats.observe_lookup(time.monotonic() - question.asked_at)
        tiers, claim = self.caches.answer(question)
        hit = len(tiers) * cs
        if first:  # once per request: the hit statistics
            st.counted = True
            self.stats.add("requests", 1)
            self.stats.add("lookup_tokens", len(st.hashes) * cs)
            self.stats.add("hit_tokens", hit)
        # Another request or instance is computing the first chunk we miss: wait for it unless vLLM's own
        # prefix cache already covers that chunk, or this request already waited lock_timeout without the
        # other owner storing anything (progress restarts the clock: a long prefill stores chunk by chunk).
        if claim == "busy" and hit + cs > num_computed_tokens and not st.waited_out:
            now = time.monotonic()
            if st.busy_since is None or hit > st.busy_hit:
                st.busy_since, st.busy_hit, st.busy_asks = now, hit, 0
            st.busy_asks += 1
            if now - st.busy_since < self.lock_timeout or not self.fallback_on_timeout:
                self._waiting.add(request.request_id)
                return None, False
            st.waited_out = True
            self.stats.add("lock_timeouts", 1)
            log.info("lmcache: request %s waited %.1fs for chunks another owner computes; computing them",
                     request.request_id, now - st.busy_since)
        st.busy_since = None
        self._waiting.discard(request.request_id)
        st.computed_at_ask = num_computed_tokens
        st.tiers = tiers
        usable = min(hit, request.num_tokens - 1)  # the last token is always computed: it yields logits
        st.prefix_hit = usable
        extended = st.segments.extend(usable, request.num_tokens - 1) if st.segments is not None else usable
        if extended > usable:  # cached segments continue the run; moved per token (any position)
            usable = extended
            st.prefix_save_limit = st.prefix_hit // cs
        elif self.whole_blocks:  # vLLM's num_computed_tokens is block-aligned here, so whole blocks only
            usable -= usable % self.block_size
            st.prefix_hit = usable
        st.stored_chunks = max(st.stored_chunks, hit // cs)
        new = max(0, usable - num_computed_tokens)
        return new, new > 0 and self._background(st, num_computed_tokens, usable)

    def _background(self, st: _Request, start: int, end: int) -> bool:
        """Load in the background when any chunk of [start, end) is on disk or in Redis on some rank."""
        if not self.settings.cache.async_load:
            return False
        cs = self.chunk_size
        slow = any(t not in MEMORY_TIERS for t in st.tiers[start // cs: -(-min(end, st.prefix_hit) // cs)])
        if st.segments is not None and end > st.prefix_hit:
            slow = slow or any(st.segments.tiers[i] not in MEMORY_TIERS for i in st.segments.run)
        return slow

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is not None and num_external_tokens > 0:
            start = st.computed_at_ask
            end = start + num_external_tokens
            st.pending_load = (start, end, self._background(st, start, end))

    def get_external_cache_hit_sources(self, request, num_external_tokens: int) -> dict:
        """vLLM's per-source split of the tokens we load: by the slowest tier holding each chunk."""
        st = self._reqs.get(request.request_id)
        if st is None or not num_external_tokens or st.pending_load is None:
            return {}
        start, cs = st.pending_load[0], self.chunk_size
        out: dict = {}
        for pos in range(start, start + num_external_tokens, cs):
            i = pos // cs
            source = _HOST_SOURCES.get(st.tiers[i], CacheHitSource.EXTERNAL_UNSPECIFIED) if i < len(st.tiers) \
                else CacheHitSource.EXTERNAL_UNSPECIFIED  # segment chunks
            n = min(cs - pos % cs, start + num_external_tokens - pos)
            out[source] = out.get(source, 0) + n
        return out

    # -- each step ----------------------------------------------------------------------------------------

    def _scheduled(self, out):
        for new in out.scheduled_new_reqs:
            yield new.req_id, new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        yield from zip(cached.req_ids, cached.num_computed_tokens)

    def _block_ids(self, req_id: str) -> list[int]:
        (ids,) = self.kv_cache_manager.get_block_ids(req_id)
        return ids

    def _plan_load(self, meta: LMCacheCoreMetadata, req_id: str, st: _Request) -> list[int]:
        start, end, background = st.pending_load
        block_ids = self._block_ids(req_id)
        cs, bs = self.chunk_size, self.block_size
        prefix_end = min(end, max(start, st.prefix_hit))
        st.pending_load, st.loading, st.loaded_upto = None, (start, prefix_end, end, background), None
        if prefix_end > start:
            first, last = start // cs, -(-prefix_end // cs)
            meta.loads.append(LoadSpec(req_id, st.hashes[first:last], first * cs, start, prefix_end,
                                       slots_for(block_ids, bs, start, prefix_end), background))
        if end > prefix_end:
            meta.segment_loads.append(SegmentLoadSpec(
                req_id, st.segments.load_pieces(prefix_end, end), prefix_end, end,
                slots_for(block_ids, bs, prefix_end, end), background))
        return block_ids

    def build_connector_meta(self, scheduler_output) -> LMCacheCoreMetadata:
        meta = LMCacheCoreMetadata(failures_seen=self._failures_seen,
                                   idle=not scheduler_output.total_num_scheduled_tokens, waiting=bool(self._waiting))
        self._failures_seen = set()
        cs, bs = self.chunk_size, self.block_size
        for req_id, st in self._reqs.items():  # background loads: their requests are not scheduled
            if st.pending_load is not None and st.pending_load[2]:
                self._plan_load(meta, req_id, st)
        for req_id, num_computed in self._scheduled(scheduler_output):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            block_ids = self._plan_load(meta, req_id, st) if st.pending_load is not None else None
            # Tokens with KV by the end of this step (chunked prefill: maybe not all yet).
            computed = min(num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0), len(st.prompt))
            if st.segments is not None:
                todo = st.segments.take_saves(computed)
                if todo:
                    block_ids = block_ids if block_ids is not None else self._block_ids(req_id)
                    meta.segment_saves.append(SegmentSaveSpec(
                        req_id, [(st.segments.hashes[i], c.start, c.length) for i, c in todo],
                        [slots_for(block_ids, bs, c.start, c.end) for _, c in todo]))
                    self.stats.add("segment_stored_tokens", sum(c.length for _, c in todo))
            done = computed // cs
            if st.prefix_save_limit is not None:
                done = min(done, st.prefix_save_limit)
            if done > st.stored_chunks:
                block_ids = block_ids if block_ids is not None else self._block_ids(req_id)
                first = st.stored_chunks
                meta.saves.append(SaveSpec(req_id, st.hashes[first:done], slots_for(block_ids, bs, first * cs, done * cs)))
                self.stats.add("stored_tokens", (done - first) * cs)
                st.stored_chunks = done
            self._plan_pins(meta, req_id, st)
        return meta

    def _plan_pins(self, meta: LMCacheCoreMetadata, req_id: str, st: _Request) -> None:
        """An unpin at once; a pin once its chunks are cached or saved by this step (the workers apply pins
        after the step's saves)."""
        if st.unpin_chunks:
            meta.pins.append(PinSpec(req_id, st.hashes[:st.unpin_chunks], on=False))
            st.unpin_chunks = 0
        if st.pin_chunks and st.stored_chunks >= st.pin_chunks:
            meta.pins.append(PinSpec(req_id, st.hashes[:st.pin_chunks], on=True))
            st.pin_chunks = 0

    def update_connector_output(self, connector_output) -> None:
        """Loads the workers finished, and how far each got. A synchronous load is reported by every rank in
        its step (vLLM keeps the least position over the ranks); a background one by each rank in the step
        it finished, and the request is in `finished_recving` once all have. A load that fell short makes
        the workers skip that request's saves: they are planned again from the failure on."""
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        for req_id, upto in getattr(worker_meta, "loads", {}).items():
            st = self._reqs.get(req_id) or self._finishing.get(req_id)
            if st is not None and st.loading is not None:
                st.loaded_upto = upto if st.loaded_upto is None else min(st.loaded_upto, upto)
                if not st.loading[3]:
                    self._load_done(req_id, st)
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            st = self._reqs.get(req_id) or self._finishing.get(req_id)
            if st is not None and st.loading is not None and st.loaded_upto is not None:
                self._load_done(req_id, st)

    def _load_done(self, req_id: str, st: _Request) -> None:
        start, prefix_end, end, _ = st.loading
        upto = st.loaded_upto
        st.loading = st.loaded_upto = None
        self._finishing.pop(req_id, None)
        self.stats.add("loaded_tokens", max(0, upto - start))
        self.stats.add("segment_loaded_tokens", max(0, upto - prefix_end))
        if upto < end:
            self.stats.add("load_failed_tokens", end - upto)
            self._failures_seen.add(req_id)
            st.stored_chunks = min(st.stored_chunks, upto // self.chunk_size)

    def request_finished(self, request) -> tuple[bool, None]:
        st = self._reqs.pop(request.request_id, None)
        self._waiting.discard(request.request_id)
        if st is not None and st.question is not None:
            self.client.forget(st.question)
        if st is not None and st.hashes:  # chunks it claimed but never stored (aborted, or too short) are free
            self.caches.release(st.hashes, request.request_id)
        if st is not None and st.loading is not None:  # finished in its load's step: the report is still due
            self._finishing[request.request_id] = st
        return False, None  # saves are copied out of vLLM's blocks during the step: nothing holds the blocks

    def reset_cache(self) -> bool:
        """Empty the workers' memory tiers (vLLM's POST /reset_prefix_cache?reset_external=true)."""
        return self.caches.reset()

    def take_stats(self) -> LMCacheCoreStats | None:
        return self.stats.take()

    def tracked(self) -> int:
        """Requests this half keeps state for (0 once every request finished and reported its load)."""
        return len(self._reqs) + len(self._finishing)

    def shutdown(self) -> None:
        self.client.close()


def _tokenizer(vllm_config):
    """text -> token ids with the model's tokenizer, loaded on first use: as a piece inside a prompt (a
    segment_separator), or with prompt=True as the start of a prompt (special tokens added as vLLM adds them
    to a completion's prompt: a configured pinned prompt)."""
    def tokenize(text: str, prompt: bool = False) -> list[int]:
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
        return tok.encode(text, add_special_tokens=prompt)

    return tokenize
