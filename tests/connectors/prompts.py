"""The token-id prompt batches the tiny-model tests run (deterministic), each with and without the connector.

Chunk 128 = vLLM CPU's block size in most tests. Lengths cover: several chunked-prefill steps (256 tokens per
step), a chunk-aligned prompt (a full hit still computes its last token), partial last chunks, and prompts
shorter than one chunk.
"""

import random

_rng = random.Random(20240605)


def _tokens(n: int) -> list[int]:
    return [_rng.randrange(3, 1000) for _ in range(n)]


COLD_WARM = [_tokens(n) for n in (700, 640, 300, 50, 1100)]
HALVES = [p[: len(p) // 2] for p in COLD_WARM]  # prefixes of COLD_WARM, for vLLM's own prefix cache

# Two shared prefixes (300 and 128 tokens) with suffixes of different lengths, unrelated prompts of every
# size class, and an exact duplicate.
_P, _Q = _tokens(300), _tokens(128)
MIXED = [
    _P + _tokens(400),
    _P + _tokens(33),
    _tokens(100),
    _Q + _tokens(200),
    _P + _tokens(212),
    _tokens(129),
    _Q + _tokens(1),
    _tokens(511),
    _tokens(900),
    _P + _tokens(5),
]
MIXED.append(list(MIXED[0]))

FAULTS = [_tokens(n) for n in (600, 450, 260)]
CROSS = [_tokens(n) for n in (520, 260, 90)]
PREEMPT = [_tokens(n) for n in (510, 382, 254, 380, 508, 126)]  # decode crosses block boundaries

LONG_DECODE = ("preempt",)  # sets decoded with vllm_helpers.LONG_SAMPLING
TINY_SETS = {"cold_warm": COLD_WARM, "halves": HALVES, "mixed": MIXED, "faults": FAULTS, "cross": CROSS, "preempt": PREEMPT}


def shared_prefix_hits(batch: list[list[int]], chunk: int, block: int = 128) -> list[int]:
    """Tokens each prompt can load when every earlier prompt of the batch is already stored: its longest
    whole-chunk prefix that an earlier prompt shares, never its last token, whole blocks (CPU backend)."""
    out = []
    for i, p in enumerate(batch):
        best = 0
        for q in batch[:i]:
            n = 0
            while n + chunk <= min(len(p), len(q)) and p[n:n + chunk] == q[n:n + chunk]:
                n += chunk
            best = max(best, n)
        out.append(min(best, (len(p) - 1) // block * block))
    return out
