"""`--server URL` mode of `bench.ttft`: the workload against a server that is already running (e.g. `vllm
serve` with our connector on a GPU box), as text, streaming, one request at a time. Rows:
- `server-cold`: every prompt starts with a line of its own (a random nonce), so neither the server's prefix
  cache nor ours can match anything: the recompute baseline, on the same server, in the same run;
- `server-warm`: after a warm-up round of the workload's warm-up prompts (timed apart).
Hit rate: `usage.prompt_tokens_details.cached_tokens` / `usage.prompt_tokens` when the server reports them
(vLLM: `--enable-prompt-tokens-details`); else unknown.
"""

import time
import uuid

from bench.ttft.client import stream_completion
from bench.ttft.results import Result


def _measure(name: str, url: str, model: str, prompts, progress, timeout: float) -> Result:
    res = Result(name)
    for i, (label, text, n_tokens) in enumerate(prompts):
        progress.update(name, "measure", i, len(prompts))
        c = stream_completion(url, model, text, timeout)
        res.labels.append(label)
        res.ttft_s.append(c.ttft_s)
        res.first_tokens.append(c.text)
        res.prompt_tokens.append(c.prompt_tokens or n_tokens)
        res.cached_tokens.append(c.cached_tokens)
    progress.done(name)
    return res


def run_attached(url: str, model: str, workload, to_text, progress, timeout: float) -> list[Result]:
    """server-cold and server-warm rows for `workload` (token prompts, sent as text via `to_text`)."""
    measured = [(r.label, to_text(r.tokens), len(r.tokens)) for r in workload.measured]
    cold = [(label, f"[{uuid.uuid4().hex}]\n{text}", n) for label, text, n in measured]
    results = [_measure("server-cold", url, model, cold, progress, timeout)]
    t0 = time.perf_counter()
    for i, req in enumerate(workload.warmup):
        progress.update("server (warm-up)", "warm-up", i, len(workload.warmup))
        stream_completion(url, model, to_text(req.tokens), timeout)
    warmup_s = time.perf_counter() - t0
    progress.done("server (warm-up)")
    warm = _measure("server-warm", url, model, measured, progress, timeout)
    warm.warmup_s = warmup_s
    results.append(warm)
    return results
