"""A vLLM server's Prometheus `/metrics`, scraped before and after each row of `bench.ttft`'s server mode.

Samples are keyed by (name, labels) with the exposition's names (counters end in `_total`). The counters a
row reports, as deltas over the row:
- `vllm:prompt_tokens_by_source_total{source=...}`: local_compute (prompt tokens the server computed),
  local_cache_hit (vLLM's own prefix cache), external_kv_transfer (a connector's: ours);
- `vllm:prompt_tokens_cached_by_source_total{source=...}`: vLLM's hit accounting by tier (device, host,
  disk, p2p, external_unspecified);
- `vllm:lmcache_*_total`: our connector's counters (connectors/stats.py), e.g. loaded_tokens.
"""

import re
import time

from bench.ttft.client import get

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
REPORTED = {  # report key -> (metric, labels it must carry)
    "computed_tok": ("vllm:prompt_tokens_by_source_total", {"source": "local_compute"}),
    "vllm_hit_tok": ("vllm:prompt_tokens_by_source_total", {"source": "local_cache_hit"}),
    "external_tok": ("vllm:prompt_tokens_by_source_total", {"source": "external_kv_transfer"}),
    "loaded_tok": ("vllm:lmcache_loaded_tokens_total", {}),
    "lmcache_hit_tok": ("vllm:lmcache_hit_tokens_total", {}),
    "lmcache_lookup_tok": ("vllm:lmcache_lookup_tokens_total", {}),
    "load_failed_tok": ("vllm:lmcache_load_failed_tokens_total", {}),
    "stored_tok": ("vllm:lmcache_stored_tokens_total", {}),
    "requests_done": ("vllm:request_success_total", {}),
}

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """Prometheus text exposition -> {(name, frozenset(label items)): value}; comments skipped."""
    out: Samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        name, labels, value = m.groups()
        try:
            out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
        except ValueError:
            continue
    return out


def scrape(url: str, timeout: float = 30.0) -> Samples:
    status, body = get(url, "/metrics", timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{url}/metrics: HTTP {status}")
    return parse(body.decode(errors="replace"))


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of `name`'s samples that carry `labels` (None: the server exports no such sample)."""
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    return sum(hits) if hits else None


def deltas(before: Samples, after: Samples) -> dict[str, float | None]:
    """REPORTED's counters over a row (None where the server does not export one)."""
    out = {}
    for key, (name, labels) in REPORTED.items():
        a, b = total(after, name, **labels), total(before, name, **labels)
        out[key] = a - (b or 0.0) if a is not None else None
    return out


def settled(url: str, before: Samples, requests: int, deadline_s: float = 10.0) -> Samples:
    """/metrics once it counts `requests` more finished requests than `before` (vLLM updates it as outputs
    reach the API server), or at the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        after = scrape(url)
        done = (total(after, "vllm:request_success_total") or 0) - (total(before, "vllm:request_success_total") or 0)
        if done >= requests or time.monotonic() > end:
            return after
        time.sleep(0.1)
