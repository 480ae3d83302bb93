"""Running real vLLM (CPU) in the test process: build an LLM, run prompts, compare outputs, look inside.

One LLM at a time: vLLM keeps its worker-side connector and parallel state in process globals, so a second
in-process LLM while one is alive would share them. `shutdown` tears one down completely.
"""

import gc
import random
from dataclasses import dataclass

from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.inputs import TokensPrompt

BLOCK = 128  # vLLM CPU's block size
LOGPROB_ATOL = 1e-5  # float32: a prefill split differently (chunks loaded, not computed) moves logprobs ~1e-6

SAMPLING = SamplingParams(max_tokens=6, temperature=0.0, logprobs=1, ignore_eos=True, detokenize=False)
# Long enough decoding that requests need new blocks while others hold theirs: vLLM preempts.
LONG_SAMPLING = SamplingParams(max_tokens=40, temperature=0.0, logprobs=1, ignore_eos=True, detokenize=False)


@dataclass(frozen=True)
class Output:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # of the generated tokens
    num_cached_tokens: int


def connector_config(extra: dict | None = None, *, module_path: bool = True) -> KVTransferConfig:
    return KVTransferConfig(kv_connector="LMCacheCoreConnector", kv_role="kv_both",
                            kv_connector_module_path="connectors.vllm_v1" if module_path else None,
                            kv_connector_extra_config=dict(extra or {}))


def make_llm(model: str, extra: dict | None = None, *, connector: bool = True, prefix_caching: bool = False,
             batched_tokens: int = 256, text: bool = False, module_path: bool = True, max_model_len: int = 4096,
             **kwargs) -> LLM:
    if connector:
        kwargs["kv_transfer_config"] = connector_config(extra, module_path=module_path)
    return LLM(model=model, skip_tokenizer_init=not text, enforce_eager=True, dtype="float32", seed=0,
               max_num_batched_tokens=batched_tokens, max_model_len=max_model_len,
               enable_prefix_caching=prefix_caching, **kwargs)


def shutdown(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def run(llm: LLM, prompts, sampling: SamplingParams = SAMPLING) -> list[Output]:
    batch = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    outs = llm.generate(batch, sampling, use_tqdm=False)
    return [Output(tuple(o.outputs[0].token_ids),
                   tuple(next(iter(d.values())).logprob for d in o.outputs[0].logprobs or ()),
                   o.num_cached_tokens or 0) for o in outs]


def no_cache(model, prompts):
    """Outputs of an LLM without the connector: the reference."""
    llm = make_llm(model, connector=False)
    try:
        return run(llm, prompts)
    finally:
        shutdown(llm)


def warm_then_measure(model, extra, warmup, measured, sampling=None):
    """Store `warmup`, then run `measured`, in one LLM (vLLM's own prefix cache off: whatever is reused comes
    from ours); (outputs, the connector's statistics counted during `measured`)."""
    llm = make_llm(model, extra)
    try:
        run(llm, warmup)
        flush_worker()
        before = connector_totals(llm)
        outs = run(llm, measured) if sampling is None else run(llm, measured, sampling)
        after = connector_totals(llm)
        return outs, {k: v - before.get(k, 0) for k, v in after.items()}
    finally:
        shutdown(llm)


def connector_totals(llm: LLM) -> dict[str, int]:
    """The connector's statistics since the LLM started (what vLLM ships to /metrics), from the scheduler half
    (in-process engine core): every request-level counter is counted there once."""
    return dict(scheduler_half(llm).stats.totals)


def worker_engine():
    """The cache engine of this process's worker (in-process, TP=1)."""
    return worker_half().engine


def flush_worker() -> None:
    """Every save of the steps so far is in the worker's engine, and written to its disk and Redis tiers."""
    worker_half().rank.saver.flush()
    worker_half().engine.flush()


def assert_same_outputs(reference: list[Output], got: list[Output], what: str) -> None:
    assert len(reference) == len(got), f"{what}: {len(got)} outputs, expected {len(reference)}"
    for i, (r, g) in enumerate(zip(reference, got)):
        assert g.token_ids == r.token_ids, f"{what}: prompt {i}: tokens {g.token_ids} != reference {r.token_ids}"
        worst = max((abs(a - b) for a, b in zip(r.logprobs, g.logprobs)), default=0.0)
        assert worst <= LOGPROB_ATOL, f"{what}: prompt {i}: logprobs differ by {worst:.3g} > {LOGPROB_ATOL}"


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 1000) for _ in range(n)]


def core(llm: LLM):
    """The in-process EngineCore (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core


def scheduler_half(llm: LLM):
    return core(llm).scheduler.connector._scheduler


def worker_half():
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker


def expected_hit(prompt_len: int, chunk: int) -> int:
    """Tokens a full cache hit loads on the CPU backend: whole chunks, never the prompt's last token, and
    (the CPU attention kernels order bytes inside a block their own way) whole blocks only."""
    return min(prompt_len // chunk * chunk, (prompt_len - 1) // BLOCK * BLOCK)
