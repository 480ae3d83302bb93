"""The scheduler half: answers "how many prompt tokens can be loaded" and plans each step's loads and saves.

Per request it keeps the prompt (it never changes), its chunk keys (hashed once, on the first ask), the
namespace, whether the request was counted in the statistics, the single-flight wait, the load vLLM
accepted, and how many leading chunks are known stored. Lookups touch only the cache engine's key index (and
single-flight locks), never the worker.

Timeline per request: `lookup` (once: statistics and prefetch) + `claim` (every ask) ->
`update_state_after_alloc` (vLLM accepted `n` external tokens) -> `build_connector_meta` each step it is
scheduled (its load once; every chunk whose tokens are all computed by the end of the step, once) ->
`request_finished` (release unused claims, forget the request).
"""

import logging
import time
from dataclasses import dataclass, field

from lmcache_core import metrics

from . import registry
from .metadata import LMCacheCoreMetadata, LoadSpec, SaveSpec, SegmentLoadSpec, SegmentSaveSpec, slots_for
from .segments import SegmentError, SegmentPlan, parse_separator, request_spans
from .spec import ConnectorSettings, attention_spec, configured_layout, kv_spec
from .stats import LMCacheCoreStats

log = logging.getLogger(__name__)


@dataclass
class _Request:
    prompt: list[int]
    namespace: str | None
    keys: list = field(default_factory=list)  # the prompt's chunk keys (engine.keys), for every engine call
    counted: bool = False  # looked up once for the statistics
    busy_since: float | None = None  # first "busy" answer of the current wait
    waited_out: bool = False  # a wait passed lock_timeout: compute from now on
    computed_at_ask: int = 0  # vLLM's own computed tokens at the last ask
    pending_load: tuple[int, int] | None = None  # [start, end) accepted by vLLM, not yet sent to the worker
    stored_chunks: int = 0  # chunks [0, stored_chunks) are in the cache or on their way there
    segments: SegmentPlan | None = None  # segment reuse: the prompt's segment chunks
    prefix_hit: int = 0  # exact prefix tokens cached, at the last ask
    # Chunks past this many hold KV computed after loaded segments (approximate): never stored as prefix.
    prefix_save_limit: int | None = None


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


class SchedulerHalf:
    def __init__(self, vllm_config, kv_cache_config, settings: ConnectorSettings):
        cache = settings.cache
        layout = configured_layout(vllm_config, kv_cache_config)
        spec = kv_spec(vllm_config, kv_cache_config, cache, layout, tp_rank=0)
        # In one process with the worker (TP=1) this is the worker's engine; else a lookup-only one (L3/L4).
        self.engine = registry.shared_engine(cache, spec)
        self.chunk_size = cache.chunk_size
        self.block_size = attention_spec(kv_cache_config).block_size
        self.whole_blocks = layout.whole_blocks  # prefix loads end on a block boundary (vllm_cpu)
        self.segment_reuse = cache.segment_reuse
        self.separator = (parse_separator(cache.segment_separator, _tokenizer(vllm_config))
                          if cache.segment_reuse else None)
        self.kv_cache_manager = None
        self.stats = LMCacheCoreStats()
        self._reqs: dict[str, _Request] = {}
        self._failures_seen: set[str] = set()

    # -- asks ---------------------------------------------------------------------------------------------

    def _state(self, request) -> _Request | None:
        st = self._reqs.get(request.request_id)
        if st is None and cacheable(request):
            prompt, namespace = list(request.prompt_token_ids), namespace_of(request)
            keys = self.engine.keys(prompt, namespace=namespace)
            st = self._reqs[request.request_id] = _Request(prompt, namespace, keys)
            if self.segment_reuse:
                st.segments = self._segment_plan(request, st)
        return st

    def _segment_plan(self, request, st: _Request) -> SegmentPlan | None:
        try:
            spans = request_spans(st.prompt, getattr(request, "kv_transfer_params", None), self.separator)
        except SegmentError as e:  # a bad request parameter costs the request its segment reuse, not more
            log.warning("lmcache: request %s: %s; segment reuse off for it", request.request_id, e)
            return None
        return SegmentPlan.build(self.engine, st.prompt, spans, st.namespace) if spans else None

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self._state(request)
        if st is None:
            return 0, False
        cs, engine = self.chunk_size, self.engine
        if not st.counted:  # once per request: the hit statistics, and prefetch of lower-tier chunks
            hit = engine.lookup(st.prompt, namespace=st.namespace, keys=st.keys)
            st.counted = True
            self.stats.add("requests", 1)
            self.stats.add("lookup_tokens", len(st.prompt) // cs * cs)
            self.stats.add("hit_tokens", hit)
        claim = engine.claim(st.prompt, owner=request.request_id, namespace=st.namespace, keys=st.keys)
        hit = claim.hit_tokens
        # Another request or instance is computing the first chunk we miss; wait for it unless vLLM's own
        # prefix cache already covers that chunk, or this request already waited lock_timeout.
        if claim.state == "busy" and hit + cs > num_computed_tokens and not st.waited_out:
            now = time.monotonic()
            st.busy_since = st.busy_since or now
            if now - st.busy_since < engine.lock_timeout or not engine.fallback_on_timeout:
                return None, False
            st.waited_out = True
            metrics.LOCK_TIMEOUTS.inc()
            log.info("lmcache: request %s waited %.1fs for chunks another owner computes; computing them",
                     request.request_id, now - st.busy_since)
        st.busy_since = None
        st.computed_at_ask = num_computed_tokens
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
        return max(0, usable - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is not None and num_external_tokens > 0:
            st.pending_load = (st.computed_at_ask, st.computed_at_ask + num_external_tokens)

    # -- each step ----------------------------------------------------------------------------------------

    def _scheduled(self, out):
        for new in out.scheduled_new_reqs:
            yield new.req_id, new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        yield from zip(cached.req_ids, cached.num_computed_tokens)

    def _block_ids(self, req_id: str) -> list[int]:
        (ids,) = self.kv_cache_manager.get_block_ids(req_id)
        return ids

    def build_connector_meta(self, scheduler_output) -> LMCacheCoreMetadata:
        meta = LMCacheCoreMetadata(failures_seen=self._failures_seen)
        self._failures_seen = set()
        cs, bs = self.chunk_size, self.block_size
        for req_id, num_computed in self._scheduled(scheduler_output):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            block_ids = None
            if st.pending_load is not None:
                start, end = st.pending_load
                st.pending_load = None
                block_ids = self._block_ids(req_id)
                prefix_end = min(end, max(start, st.prefix_hit))
                if prefix_end > start:
                    whole = -(-prefix_end // cs) * cs
                    meta.loads.append(LoadSpec(req_id, st.prompt[:whole], st.namespace, start, prefix_end,
                                               slots_for(block_ids, bs, start, prefix_end)))
                if end > prefix_end:
                    meta.segment_loads.append(SegmentLoadSpec(
                        req_id, st.segments.load_pieces(prefix_end, end), prefix_end, end,
                        slots_for(block_ids, bs, prefix_end, end)))
            # Tokens with KV by the end of this step (chunked prefill: maybe not all yet).
            computed = min(num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0), len(st.prompt))
            if st.segments is not None:
                todo = st.segments.take_saves(computed)
                if todo:
                    block_ids = block_ids if block_ids is not None else self._block_ids(req_id)
                    meta.segment_saves.append(SegmentSaveSpec(
                        req_id, [(st.segments.keys[i], c.start, c.length) for i, c in todo],
                        [slots_for(block_ids, bs, c.start, c.end) for _, c in todo]))
            done = computed // cs
            if st.prefix_save_limit is not None:
                done = min(done, st.prefix_save_limit)
            if done > st.stored_chunks:
                block_ids = block_ids if block_ids is not None else self._block_ids(req_id)
                meta.saves.append(SaveSpec(req_id, st.prompt[:done * cs], st.namespace,
                                           slots_for(block_ids, bs, 0, done * cs), st.stored_chunks))
                st.stored_chunks = done
        return meta

    def update_connector_output(self, connector_output) -> None:
        """A failed load: the worker skipped that request's saves; plan them again from the failure on."""
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        for req_id, position in getattr(worker_meta, "failed_loads", {}).items():
            self._failures_seen.add(req_id)
            st = self._reqs.get(req_id)
            if st is not None:
                st.stored_chunks = min(st.stored_chunks, position // self.chunk_size)

    def request_finished(self, request) -> tuple[bool, None]:
        st = self._reqs.pop(request.request_id, None)
        if st is not None:  # chunks it claimed but never stored (aborted, or too short) are free again
            self.engine.release(st.prompt, owner=request.request_id, namespace=st.namespace, keys=st.keys)
        return False, None  # saves are copied out of vLLM's blocks during the step: nothing holds the blocks

    def take_stats(self) -> LMCacheCoreStats | None:
        return self.stats.take()


def _tokenizer(vllm_config):
    """text -> token ids with the model's tokenizer (for a text segment_separator), loaded on first use."""
    def tokenize(text: str) -> list[int]:
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
        return tok.encode(text, add_special_tokens=False)

    return tokenize
