"""Quality of approximate KV reuse in `bench.ttft`: what a scenario's cache does to the model's output,
measured against full recompute on the same prompts in the same run.

Per measured prompt, apart from the TTFT requests (never timed):
- greedy continuation: `CONTINUATION_TOKENS` tokens at temperature 0 (EOS ignored, so every continuation
  has the same length);
- log-likelihood: recompute's continuation appended to the prompt and sent with `prompt_logprobs`; the
  logprobs of its last `CONTINUATION_TOKENS` positions are those of recompute's continuation under the
  scenario's cache (the continuation is new text, so it is computed, never loaded).

Figures, from those:
- `agree`: the fraction of prompts whose continuation equals recompute's, all tokens;
- `agree_tok`: the mean fraction of leading tokens that equal recompute's (a continuation that leaves
  recompute's path at token 4 scores 3/16, whatever follows);
- `nll`: mean negative log-likelihood per token of recompute's continuations;
- `ppl_ratio`: exp(nll - nll of recompute), the perplexity of recompute's continuations under the
  scenario's cache over their perplexity under recompute (1.0: no loss; larger: worse).
"""

import math
from collections.abc import Sequence

import numpy as np

CONTINUATION_TOKENS = 16


def _padded(rows: Sequence[Sequence[int]], width: int, fill: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        row = list(row)[:width]
        out[i, : len(row)] = row
    return out


def agreement(reference: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(fraction of prompts whose tokens equal the reference's, mean fraction of leading tokens that do).

    A continuation shorter than its reference counts its missing tokens as disagreeing."""
    if len(reference) != len(got):
        raise ValueError(f"agreement: {len(reference)} reference continuations, {len(got)} to compare")
    if not reference:
        raise ValueError("agreement: no continuations")
    width = max(len(r) for r in reference)
    if width == 0:
        raise ValueError("agreement: empty reference continuations")
    ref, cmp = _padded(reference, width, -1), _padded(got, width, -2)
    lengths = np.array([len(r) for r in reference])
    valid = np.arange(width) < lengths[:, None]
    equal = (ref == cmp) | ~valid  # positions past a reference's end do not count against it
    leading = np.cumprod(equal, axis=1).sum(axis=1).clip(max=lengths)
    return float(equal.all(axis=1).mean()), float((leading / lengths).mean())


def continuation_logprobs(prompt_logprobs: Sequence, continuation: Sequence[int]) -> list[float]:
    """Logprobs of `continuation` from vLLM's `RequestOutput.prompt_logprobs` of prompt + continuation (a
    list per prompt position of {token id: Logprob}; None for the first position)."""
    n = len(continuation)
    tail = list(prompt_logprobs or [])[-n:] if n else []
    if len(tail) != n or any(entry is None for entry in tail):
        raise ValueError(f"prompt_logprobs: expected entries for the last {n} positions, got {len(tail)}")
    missing = [t for entry, t in zip(tail, continuation) if t not in entry]
    if missing:
        raise ValueError(f"prompt_logprobs: no logprob for continuation token(s) {missing[:4]}")
    return [float(entry[t].logprob) for entry, t in zip(tail, continuation)]


def mean_nll(logprobs: Sequence[Sequence[float]]) -> float:
    """Mean negative log-likelihood per token over every prompt's continuation."""
    flat = np.concatenate([np.asarray(lp, dtype=np.float64) for lp in logprobs]) if logprobs else np.empty(0)
    if flat.size == 0:
        raise ValueError("mean_nll: no logprobs")
    return float(-flat.mean())


def perplexity_ratio(nll: float, reference_nll: float) -> float:
    """exp(nll - reference_nll): the perplexity under a scenario over the perplexity under the reference."""
    return math.exp(nll - reference_nll)


def quality_figures(ref_continuations, ref_logprobs, continuations, logprobs) -> dict[str, float]:
    """The row's quality columns: agreement with the reference's continuations, NLL and perplexity ratio."""
    agree, agree_tokens = agreement(ref_continuations, continuations)
    nll, ref_nll = mean_nll(logprobs), mean_nll(ref_logprobs)
    return {"agree": agree, "agree_tok": agree_tokens, "nll": nll, "ppl_ratio": perplexity_ratio(nll, ref_nll)}
