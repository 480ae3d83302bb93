"""What one scenario of `bench.ttft` measured: a `Result` per row of the report, whichever mode ran it."""

from dataclasses import dataclass, field


@dataclass
class Result:
    scenario: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    labels: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    first_tokens: list[int | str | None] = field(default_factory=list)  # ids; text from a server without ids
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int | None] = field(default_factory=list)  # tokens not computed by the request
    build_s: float | None = None
    warmup_s: float | None = None
    tier_hits: dict[str, int] | None = None  # ours: chunk reads per tier during the measurement
    tier_read_bytes: dict[str, int] | None = None
    retrieve_s: float | None = None  # ours: engine time in retrieve (lookups, reads, decode)
    # Connector statistics per measured request (SEGMENT_SCENARIOS): tokens loaded, and of those, from
    # segment chunks (None: the connector does not report it).
    reused_tokens: list[int | None] = field(default_factory=list)
    segment_tokens: list[int | None] = field(default_factory=list)
    # Quality round (bench/ttft/quality.py), per measured prompt: the greedy continuation, and the logprobs
    # of the reference's (recompute's) continuation under this scenario's cache.
    continuations: list[tuple[int, ...]] = field(default_factory=list)
    ref_logprobs: list[list[float]] = field(default_factory=list)
    # Server modes: the server's log, and its /metrics counters over the row (bench/ttft/metrics.py).
    server_log: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def fail(self, why: str) -> "Result":
        self.status, self.reason = "failed", why
        return self


def skipped(scenario: str, why: str) -> Result:
    return Result(scenario, "skipped", why)
