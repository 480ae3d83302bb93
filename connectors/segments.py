"""Segment (position-independent) reuse: which spans of a prompt are segments, the chunks that key them, the
leading run a new prompt can load, and the RoPE parameters that move a cached segment's K to new positions.

A segment is a span of the prompt whose KV may be reused wherever the same tokens appear again (a RAG
passage, a document, a tool output), even after a different preamble. Spans come from a separator token
sequence (each segment ends just after a separator, so the spans tile the prompt) or from explicit
`[start, end)` boundaries a request passes in `kv_transfer_params["segments"]`.

Each segment is cut into chunks of `chunk_size` tokens from its own start; its last chunk may be shorter
(the tail). A chunk's key hashes its own tokens only (`chunk_hashes(mode="segment")`; a tail is hashed as
one chunk of its length), so it matches at any position. The KV stored under it was computed at some
position p (recorded in the chunk header); loaded at q, K is re-rotated by q - p (`kernels.rope_shift`).

Reuse is approximate: the cached KV was computed after other text than what now precedes it. Off unless
configured (`segment_reuse: true`), and a request can opt out (`kv_transfer_params={"segment_reuse": False}`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels import chunk_hashes
from kernels.chunk_hash import as_token_words


class SegmentError(ValueError):
    """Bad segment configuration or boundaries, or a model whose positions cannot be re-rotated."""


@dataclass(frozen=True)
class SegmentChunk:
    start: int  # position of its first token in this prompt
    length: int  # tokens: chunk_size, or fewer for a segment's tail
    chunk_hash: bytes  # 16 bytes, segment mode

    @property
    def end(self) -> int:
        return self.start + self.length


def parse_separator(value: Any, tokenize: Callable[[str], list[int]] | None = None) -> tuple[int, ...] | None:
    """The separator as token ids: None/"" for none, a list of ints or "ids:13,198" as given, other text
    through `tokenize` (the model's tokenizer)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str) and value.startswith("ids:"):
        try:
            value = [int(v) for v in value[4:].split(",")]
        except ValueError:
            raise SegmentError(f"segment_separator: expected ids:<int>,<int>,..., got {value!r}") from None
    if isinstance(value, str):
        if tokenize is None:
            raise SegmentError("segment_separator: a string needs the model's tokenizer, which is not available "
                               "here; give token ids instead")
        ids = tuple(tokenize(value))
        if not ids:
            raise SegmentError(f"segment_separator: {value!r} tokenizes to no tokens")
        return ids
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                for v in value):
        return tuple(value)
    raise SegmentError(f"segment_separator: expected a string or a list of token ids, got {value!r}")


def parse_prompt(value: str, tokenize: Callable[[str], list[int]]) -> list[int]:
    """A configured prompt as token ids: "ids:1,2,3" as written, other text through `tokenize` (the model's
    tokenizer, special tokens as it adds them to a prompt)."""
    if value.startswith("ids:"):
        return [int(v) for v in value[4:].split(",")]
    return list(tokenize(value, prompt=True))


def separator_ends(token_ids, separator: Sequence[int]) -> list[int]:
    """Positions just after each occurrence of `separator` in `token_ids`, scanning left to right without
    overlaps (matched in one numpy pass; only repetitive multi-token separators can overlap)."""
    words = as_token_words(token_ids)
    sep = np.asarray(list(separator), dtype=words.dtype)
    k = sep.size
    if not k or words.size < k:
        return []
    starts = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(words, k) == sep).all(axis=1))
    ends, last = [], 0
    for s in starts.tolist():
        if s >= last:
            last = s + k
            ends.append(last)
    return ends


def split_at_separator(token_ids, separator: Sequence[int]) -> list[tuple[int, int]]:
    """Spans tiling the prompt, each ending just after an occurrence of `separator` (the last one at the
    end of the prompt). A prompt without the separator is one span."""
    n = int(as_token_words(token_ids).size)
    bounds = [0, *(e for e in separator_ends(token_ids, separator) if e < n), n]
    return [(a, b) for a, b in zip(bounds, bounds[1:])] if n else []


def check_segments(segments: Any, num_tokens: int) -> list[tuple[int, int]]:
    """Explicit boundaries from a request: sorted, non-overlapping `[start, end)` pairs inside the prompt."""
    if not isinstance(segments, (list, tuple)):
        raise SegmentError(f'kv_transfer_params["segments"]: expected a list of [start, end] pairs, got '
                           f"{type(segments).__name__}")
    spans, last = [], 0
    for i, pair in enumerate(segments):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise SegmentError(f'kv_transfer_params["segments"][{i}]: expected [start, end] ints, got {pair!r}')
        start, end = pair
        if not last <= start < end <= num_tokens:
            raise SegmentError(f'kv_transfer_params["segments"][{i}]: [{start}, {end}) must be non-empty, '
                               f"sorted, non-overlapping and inside the prompt of {num_tokens} tokens")
        spans.append((start, end))
        last = end
    return spans


def segment_chunks(token_ids, spans: Sequence[tuple[int, int]], chunk_size: int, salt: bytes = b"",
                   algo: str = "sha256") -> list[SegmentChunk]:
    """Every segment's chunks, in prompt order: full chunks from the segment's start, then its tail."""
    words = as_token_words(token_ids)
    out = []
    for start, end in spans:
        seg = words[start:end]
        full = (end - start) // chunk_size
        for i, h in enumerate(chunk_hashes(seg, chunk_size=chunk_size, mode="segment", salt=salt, algo=algo)):
            out.append(SegmentChunk(start + i * chunk_size, chunk_size, h))
        tail = seg[full * chunk_size:]
        if tail.size:
            (h,) = chunk_hashes(tail, chunk_size=int(tail.size), mode="segment", salt=salt, algo=algo)
            out.append(SegmentChunk(start + full * chunk_size, int(tail.size), h))
    return out


def leading_run(start: int, chunks: Sequence[SegmentChunk], cached: Sequence[bool], limit: int) -> list[int]:
    """Indices of the segment chunks that extend a run of loadable tokens from `start` (where exact prefix
    reuse ended): consecutive cached chunks, the first one holding position `start` (prefix chunks and
    segment chunks are cut on different grids: its part from `start` on is loaded), none ending past `limit`."""
    run, pos = [], start
    for i, (chunk, hit) in enumerate(zip(chunks, cached)):
        if chunk.end <= pos:
            continue
        if chunk.start > pos or not hit or chunk.end > limit:
            break
        run.append(i)
        pos = chunk.end
    return run


def request_spans(prompt, params: dict | None, separator: tuple[int, ...] | None) -> list[tuple[int, int]] | None:
    """A request's segment spans: its explicit `kv_transfer_params["segments"]`, else the separator's; None
    when it opted out (`"segment_reuse": false`) or nothing delimits segments."""
    params = params or {}
    if params.get("segment_reuse", True) is False:
        return None
    if "segments" in params:
        return check_segments(params["segments"], len(prompt))
    return split_at_separator(prompt, separator) if separator else None


@dataclass
class SegmentPlan:
    """One request's segment chunks, where they were cached when it was first asked about, the run it loads,
    and which computed chunks it has stored."""

    chunks: list[SegmentChunk]
    hashes: list[bytes]  # per chunk (segment mode)
    tiers: list[str | None]  # per chunk: the slowest tier holding it over the workers, None: not cached
    run: list[int] = field(default_factory=list)  # indices of the chunks the accepted load covers
    saved: set[int] = field(default_factory=set)  # indices stored (or cached already)

    @classmethod
    def build(cls, caches, prompt, spans, namespace: str | None) -> "SegmentPlan | None":
        """caches: `chunk_size`, `salt(namespace)` and `contains(hashes) -> tiers` of the workers' caches."""
        chunks = segment_chunks(prompt, spans, caches.chunk_size, salt=caches.salt(namespace))
        if not chunks:
            return None
        hashes = [c.chunk_hash for c in chunks]
        tiers = caches.contains(hashes)
        return cls(chunks, hashes, tiers, saved={i for i, t in enumerate(tiers) if t is not None})

    def extend(self, start: int, limit: int) -> int:
        """Where the loadable run that exact prefix reuse ended at `start` ends, with cached segment chunks
        (none ending past `limit`); remembers the chunks it uses."""
        self.run = leading_run(start, self.chunks, [t is not None for t in self.tiers], limit)
        return self.chunks[self.run[-1]].end if self.run else start

    def load_pieces(self, start: int, end: int) -> list[tuple]:
        """(hash, chunk start, tokens) of the run's chunks that overlap [start, end)."""
        return [(self.hashes[i], self.chunks[i].start, self.chunks[i].length) for i in self.run
                if self.chunks[i].start < end and self.chunks[i].end > start]

    def take_saves(self, computed: int) -> list[tuple[int, SegmentChunk]]:
        """Chunks not cached yet whose tokens all have KV once `computed` tokens are computed; marked saved."""
        out = [(i, c) for i, c in enumerate(self.chunks) if i not in self.saved and c.end <= computed]
        self.saved.update(i for i, _ in out)
        return out


# ---------------------------------------------------------------------------------------------------------
# RoPE parameters, from the rotary embeddings vLLM built for the model
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeParams:
    rope_theta: float
    rotary_dim: int
    is_neox: bool
    rope_scaling: dict | None  # None, or {"rope_type": "linear" | "llama3", ...} as kernels.rope_shift takes

    def shift_kwargs(self) -> dict:
        return {"rope_theta": self.rope_theta, "rotary_dim": self.rotary_dim, "is_neox": self.is_neox,
                "rope_scaling": self.rope_scaling}


def _describe(emb) -> RopeParams:
    """RopeParams of one vLLM rotary embedding module, or SegmentError when it cannot be re-rotated."""
    kind = type(emb).__name__
    base = dict(rope_theta=float(emb.base), rotary_dim=int(emb.rotary_dim), is_neox=bool(emb.is_neox_style))
    if kind == "RotaryEmbedding":
        return RopeParams(**base, rope_scaling=None)
    if kind == "LinearScalingRotaryEmbedding":
        factors = list(getattr(emb, "scaling_factors", []) or [])
        if len(set(factors)) == 1:
            return RopeParams(**base, rope_scaling={"rope_type": "linear", "factor": float(factors[0])})
    if kind == "Llama3RotaryEmbedding":
        return RopeParams(**base, rope_scaling={
            "rope_type": "llama3", "factor": float(emb.scaling_factor), "low_freq_factor": float(emb.low_freq_factor),
            "high_freq_factor": float(emb.high_freq_factor),
            "original_max_position_embeddings": float(emb.orig_max_position)})
    raise SegmentError(f"segment reuse: the model's rotary embedding {kind} cannot be re-rotated by a position "
                       "shift (supported: plain RoPE, linear and llama3 scaling); turn segment_reuse off")


def rope_params(vllm_config, head_size: int) -> RopeParams:
    """The model's RoPE, read from the rotary embedding modules vLLM created for it (after the model is
    loaded, in the worker process). Refuses models without RoPE (ALiBi, learned positions) and models whose
    layers disagree."""
    from vllm.model_executor.layers import rotary_embedding

    model_config = vllm_config.model_config
    max_pos = getattr(model_config.hf_config, "max_position_embeddings", None)
    found = {}
    for key, emb in list(rotary_embedding._ROPE_DICT.items()):
        if key[0] != head_size or (max_pos is not None and key[2] != max_pos):
            continue  # another model's, built earlier in this process
        found[key] = _describe(emb)
    if not found:
        raise SegmentError(f"segment reuse: {model_config.model} has no rotary position embedding (RoPE) that "
                           "can be re-rotated (ALiBi or learned positions?); turn segment_reuse off")
    distinct = {(p.rope_theta, p.rotary_dim, p.is_neox, repr(p.rope_scaling)) for p in found.values()}
    if len(distinct) != 1:
        raise SegmentError(f"segment reuse: {model_config.model} uses {len(distinct)} different rotary "
                           "embeddings; only models with one are supported")
    return next(iter(found.values()))
