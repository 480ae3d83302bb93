"""What every server that `bench.ttft`'s server modes start shares: the model, the sizes, where logs go, and
our connector's settings (kv_connector_extra_config) for the run.

Sizes: vLLM's CPU KV cache (`VLLM_CPU_KVCACHE_SPACE`, whole GiB) holds every distinct 128-token block of the
run plus `concurrency` prompts of max_model_len, x1.25; our L1 and L2 (`max_device_cache_size`,
`max_local_cpu_size`) each hold every distinct chunk of the run, x1.25 + 64 MiB. A fresh `cache_salt` per
run: a run never loads an earlier run's chunks from a shared Redis.
"""

import contextlib
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from bench.ttft.client import stream_completion
from bench.ttft.servers import ServerSpec, VllmServer
from bench.ttft.sizing import context_length, distinct_chunks, model_geometry

GiB = 2**30
ENV_SHOWN = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_SERVER_DEV_MODE", "VLLM_CPU_OMP_THREADS_BIND")
TOKEN_IDS = {"return_token_ids": True}  # vLLM streams each event's token ids: first tokens compared exactly
FIRST_CALL_TOKENS = 512  # each server's own first requests (out of every figure), as the in-process harness


@dataclass
class Plan:
    model: str
    dtype: str
    max_model_len: int
    chunk_size: int
    kv_bytes_per_token: int
    kv_cache_gib: int
    cache_bytes: int  # each of our memory tiers
    batched_tokens: int | None
    remote_url: str | None
    ours_config: dict
    log_dir: str
    l3_dir: str
    salt: str
    progress: object
    first_call_tokens: tuple[int, ...] = ()  # a prompt sharing no prefix with the workload (its text reversed)
    start_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    started: list[VllmServer] = field(default_factory=list)  # every server of the run, for the report

    def spec(self, connector: dict | None = None, prefix_caching: bool = True) -> ServerSpec:
        return ServerSpec(model=self.model, max_model_len=self.max_model_len, kv_cache_gib=self.kv_cache_gib,
                          dtype=self.dtype, prefix_caching=prefix_caching, connector=connector,
                          batched_tokens=self.batched_tokens)

    def server(self, name: str, spec: ServerSpec) -> VllmServer:
        """A server of this run (not started: use it as a context manager), recorded for the report."""
        server = VllmServer(spec, name, self.log_dir, start_timeout_s=self.start_timeout_s)
        self.started.append(server)
        return server

    def first_calls(self, server) -> None:
        """Two requests of the server's own before anything is measured (its first forward passes and first
        loads cost more): a cold prompt, then the same prompt extended (a cache hit where there is a cache)."""
        for tokens in (self.first_call_tokens[:-16], self.first_call_tokens):
            stream_completion(server.url, self.model, list(tokens), self.request_timeout_s)

    @contextlib.contextmanager
    def running(self, name: str, spec: ServerSpec):
        """A started server of this run that served its first calls; stopped on the way out, however."""
        with self.server(name, spec) as server:
            self.first_calls(server)
            yield server

    def ours_extra(self, *, disk: bool = True, remote: bool = True, salt: str | None = None, **overrides) -> dict:
        """Our connector's settings: L1 + L2 sized for the run, L3 in this run's directory (`disk`), L4 at
        --remote-url (`remote`, when given), this run's salt; --ours-config, then `overrides`, on top."""
        extra = {"chunk_size": self.chunk_size, "max_device_cache_size": f"{self.cache_bytes}B",
                 "max_local_cpu_size": f"{self.cache_bytes}B", "cache_salt": salt or self.salt}
        if disk:
            extra["local_cache_dir"] = self.l3_dir
        if remote and self.remote_url:
            extra.update(remote_url=self.remote_url, remote_ttl=3600.0)  # our entries leave Redis within an hour
        return {**extra, **self.ours_config, **overrides}

    def describe(self) -> dict:
        return {"model": self.model, "max_model_len": self.max_model_len, "VLLM_CPU_KVCACHE_SPACE": self.kv_cache_gib,
                "cache_bytes_per_memory_tier": self.cache_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "cache_salt": self.salt, "server_logs": self.log_dir,
                "servers": [{"name": s.name, "log": s.log_path, "start_s": s.start_s, "pgid": s.pgid, "command": s.spec.command(0),
                             "env": {k: s.env[k] for k in ENV_SHOWN if k in s.env}} for s in self.started]}


def log_dir_for(output: str | None, given: str | None) -> str:
    """Where the servers' logs go: `given`, else beside the JSON report, else a new temporary folder. Kept
    after the run: the report names the files."""
    if given:
        os.makedirs(given, exist_ok=True)
        return given
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if output:
        path = os.path.join(os.path.dirname(os.path.abspath(output)), f"ttft-servers-{stamp}")
        os.makedirs(path, exist_ok=True)
        return path
    return tempfile.mkdtemp(prefix=f"ttft-servers-{stamp}-")


def make_plan(cfg, model: str, requests, concurrency: int, progress, log_dir: str, decode_tokens: int = 1) -> Plan:
    """The plan for `cfg` (bench.ttft.config.Config) on `model`, sized for `requests` (every prompt of the run)
    with up to `concurrency` in flight on one server, each generating up to `decode_tokens`."""
    max_positions, bpt = model_geometry(model, cfg.dtype)
    longest = max(len(r.tokens) for r in requests)
    max_len = context_length(longest, max_positions, cfg.max_model_len)
    if longest + decode_tokens > max_len:
        raise ValueError(f"--doc-tokens: the longest prompt is {longest} tokens but the model takes {max_len} "
                         "(max_model_len); lower --doc-tokens (or --turn-tokens/--questions/--decode-tokens)")
    kv_tokens = distinct_chunks(requests, 128) * 128 + concurrency * max_len
    cache_bytes = int(distinct_chunks(requests, cfg.chunk_size) * cfg.chunk_size * bpt * 1.25) + 64 * 2**20
    return Plan(model=model, dtype=cfg.dtype, max_model_len=max_len, chunk_size=cfg.chunk_size,
                kv_bytes_per_token=bpt, kv_cache_gib=max(1, math.ceil(1.25 * kv_tokens * bpt / GiB)),
                cache_bytes=cache_bytes, batched_tokens=cfg.batched_tokens, remote_url=cfg.remote_url,
                ours_config=dict(cfg.ours_config), log_dir=log_dir, l3_dir=tempfile.mkdtemp(prefix="ttft-l3-"),
                salt=f"bench-ttft-{uuid.uuid4().hex[:12]}", progress=progress,
                first_call_tokens=tuple(requests[0].tokens[::-1][:FIRST_CALL_TOKENS + 16]),
                start_timeout_s=cfg.start_timeout_s, request_timeout_s=cfg.timeout_s)
