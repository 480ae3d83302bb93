"""Other KV connectors `bench.ttft` measures in process, beside ours:
- `example-connector`: vLLM's ExampleConnector (disk), same prefill step as the others;
  `example-connector-1step`: the same with the whole prompt in one prefill step (it stores only the first
  step's KV of a longer prompt). It reuses whole prompts only: its warm-up round is the measured prompts.
- `offloading-connector`: vLLM's OffloadingConnector (CPU offload), warm-up and measurement in one LLM.
- `lmcache`: LMCache's LMCacheConnectorV1, when the `lmcache` package is importable.
"""

import importlib.util
import shutil
import tempfile

from bench.ttft.harness import Context, guarded, warm_then_measure
from bench.ttft.results import Result, skipped


def example_connector(ctx: Context, one_step: bool) -> Result:
    from vllm.config import KVTransferConfig

    name = "example-connector-1step" if one_step else "example-connector"
    longest, step = ctx.workload.longest, ctx.step_tokens
    if one_step and step and step >= longest:
        return skipped(name, f"every prompt fits in one prefill step ({step} tokens): same as example-connector")
    res = Result(name, notes=["warm-up = the measured prompts (it reuses whole prompts only)"])
    path = tempfile.mkdtemp(prefix="ttft-example-")
    kv = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                          kv_connector_extra_config={"shared_storage_path": path})
    try:
        guarded(ctx, res, lambda: warm_then_measure(ctx, res, ctx.workload.measured, fresh=True, kv=kv,
                                                    batched_tokens=max(longest, step or 0) if one_step else None))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if res.status == "failed" and step and longest > step and not one_step:
        res.reason += f" (prompts up to {longest} tokens, prefill step {step})"
    return res


def offloading_connector(ctx: Context) -> Result:
    from vllm.config import KVTransferConfig
    from vllm.platforms import current_platform

    name = "offloading-connector"
    if not (current_platform.is_cuda_alike() or current_platform.is_xpu()):
        return skipped(name, f"vLLM's CPU offloading needs a CUDA-alike or XPU GPU; it raises at start-up on "
                             f"{current_platform.device_type!r} (vllm/v1/kv_offload/cpu/spec.py)")
    res = Result(name, notes=["warm-up and measurement in one LLM (its CPU store lives in the instance)"])
    kv = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                          kv_connector_extra_config={"cpu_bytes_to_use": ctx.cache_bytes})
    return guarded(ctx, res, lambda: warm_then_measure(ctx, res, ctx.workload.warmup, fresh=False, kv=kv))


def lmcache(ctx: Context) -> Result:
    from vllm.config import KVTransferConfig

    name = "lmcache"
    if importlib.util.find_spec("lmcache") is None:
        return skipped(name, "lmcache is not installed (its vLLM connector needs a GPU: LMCache 0.5.6 installed "
                             "here stops with 'No supported cpu connector found' on vLLM's CPU backend)")
    res = Result(name, notes=["LMCache with its default settings"])
    kv = KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both")
    return guarded(ctx, res, lambda: warm_then_measure(ctx, res, ctx.workload.warmup, fresh=True, kv=kv))
