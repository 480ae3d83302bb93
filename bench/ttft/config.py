"""`bench.ttft`'s settings: one frozen dataclass, filled by the command line (bench/ttft/cli.py)."""

from dataclasses import dataclass

from bench.ttft.workloads import RAG_PREAMBLE

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MODES = ("servers", "inprocess")
QUICK = {"num_docs": 1, "doc_tokens": 512, "questions": 2}
# Server mode: every server start costs ~30-90 s on 2 cores, so the default run (`make demo`: 3 servers) keeps
# its documents small; documents a multiple of the chunk size (the question then adds no chunk of its own).
SERVER_DEFAULTS = {"num_docs": 2, "doc_tokens": 1536, "questions": 2}
AVALANCHE_DEFAULTS = {"num_docs": 1, "doc_tokens": 2048, "questions": 1}
MIXED_DEFAULTS = {"num_docs": 2, "doc_tokens": 2048, "questions": 1}
# Sizes where --workload rag does not give them: passages of a realistic length (not a multiple of the
# chunk size), 6 x 2 prompts of 3 passages; --quick: 4 prompts.
RAG_DEFAULTS = {"num_docs": 6, "doc_tokens": 400, "questions": 2}
RAG_QUICK = {"num_docs": 4, "doc_tokens": 300, "questions": 1}


@dataclass(frozen=True)
class Config:
    workload: str = "long-doc-qa"
    mode: str = "servers"  # servers | inprocess (rag: inprocess only); --server URL: a running server
    num_docs: int = 2
    doc_tokens: int = 3072
    questions: int = 3
    repeat_mode: str = "random"
    turn_tokens: int = 256  # multi-turn: tokens of each reply and user message
    passages_per_prompt: int = 3  # rag
    rag_preamble: str = RAG_PREAMBLE  # rag: the instruction every prompt starts with ("": none)
    scenarios: tuple[str, ...] = ()  # (): the workload's default_scenarios
    model: str | None = None  # None: SmolLM2-135M-Instruct (bench.models.smollm2_dir)
    tokenizer: str | None = None  # None: the model's
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the longest prompt rounded up (at most the model's context)
    chunk_size: int = 256
    batched_tokens: int | None = None  # vLLM's max_num_batched_tokens (prefill step); None: vLLM's default
    remote_url: str | None = None
    ours_config: tuple[tuple[str, object], ...] = ()  # CacheConfig overrides for ours-* (--ours-config JSON)
    server: str | None = None
    timeout_s: float = 600.0  # server modes: per request
    start_timeout_s: float = 600.0  # server mode: a server's start, until GET /health answers
    log_dir: str | None = None  # server mode: where servers' logs go (None: beside --output, else a temp dir)
    avalanche_requests: int = 8
    decoders: int = 4  # mixed: requests decoding while the new ones load
    decode_tokens: int = 128  # mixed: tokens each decoder streams
    compare: tuple[tuple[tuple[str, object], ...], ...] = ((),)  # mixed: connector settings, one row set each
    seed: int = 0
    output: str | None = None
    plot: str | None = None
