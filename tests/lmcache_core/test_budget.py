"""Memory tiers are sized inside what the serving engine left: injected free/total figures (the GPU cases
cannot exist here: the device figures are passed in, nothing touches CUDA), and the real host figure."""

import pytest
import torch

from lmcache_core import CacheConfig, CacheEngine, KVSpec
from lmcache_core.budget import GiB, host_available_bytes, plan_memory

GB = 10**9
CUDA = torch.device("cuda", 0)


def test_example_yaml_on_an_80gb_gpu_at_vllms_default_utilization():
    """The README's example asks L1 = 0.3 x 80 GB = 24 GB; vLLM at gpu_memory_utilization 0.9 leaves ~8 GB."""
    cfg = CacheConfig(max_gpu_cache_ratio=0.3, max_local_cpu_size="5GB")
    plan = plan_memory(cfg, CUDA, device_free_total=(8 * GB, 80 * GB), host_available=200 * GB,
                       reserved_by="vLLM's KV cache", knobs="lower --gpu-memory-utilization")
    assert plan.l1_bytes == 8 * GB - 2 * GiB  # free minus device_memory_headroom (2 GiB default)
    assert plan.l2_bytes == 5 * GB
    (note,) = plan.notes
    assert note.startswith("L1: asked 22.35 GiB (max_gpu_cache_ratio), 7.45 GiB free on cuda:0 after vLLM's KV cache")
    assert note.endswith("L1 = 5.45 GiB; lower --gpu-memory-utilization to give it more, or ask for less "
                         "(max_gpu_cache_ratio)")


def test_l1_within_free_memory_is_not_touched():
    cfg = CacheConfig(max_gpu_cache_ratio=0.05)
    plan = plan_memory(cfg, CUDA, device_free_total=(20 * GB, 80 * GB), host_available=200 * GB)
    assert plan.l1_bytes == 4 * GB and not plan.notes


def test_explicit_device_size_and_headroom():
    cfg = CacheConfig(max_device_cache_size="10GB", device_memory_headroom="1GiB")
    plan = plan_memory(cfg, CUDA, device_free_total=(6 * GiB, 80 * GB), host_available=200 * GB)
    assert plan.l1_bytes == 5 * GiB and "max_device_cache_size" in plan.notes[0]
    full = plan_memory(cfg, CUDA, device_free_total=(GiB // 2, 80 * GB), host_available=200 * GB)
    assert full.l1_bytes == 0  # less free than the headroom: no L1, said once


def test_host_tiers_are_per_node_and_shrink_together():
    """8 workers on a node share max_local_cpu_size (1/8 each); when the host has less, every host tier
    shrinks by the same factor, one line each."""
    cfg = CacheConfig(max_local_cpu_size="80GB", host_memory_headroom="0B")
    plan = plan_memory(cfg, CUDA, workers=8, device_free_total=(10 * GB, 80 * GB), host_available=1000 * GB)
    assert plan.l2_bytes == 10 * GB and not [n for n in plan.notes if n.startswith("L2")]
    tight = plan_memory(cfg, CUDA, workers=8, device_free_total=(10 * GB, 80 * GB), host_available=40 * GB)
    assert tight.l2_bytes == 5 * GB
    assert any(n.startswith("L2: asked 9.31 GiB per worker (8 on this node)") for n in tight.notes)


def test_cpu_l1_and_l2_share_the_host_budget():
    cfg = CacheConfig(max_device_cache_size="3GB", max_local_cpu_size="1GB", host_memory_headroom="0B")
    plan = plan_memory(cfg, torch.device("cpu"), host_available=2 * GB)
    assert (plan.l1_bytes, plan.l2_bytes) == (1_500_000_000, 500_000_000)
    assert [n[:2] for n in plan.notes] == ["L1", "L2"]


def test_the_vllm_cpu_case_from_the_serving_issue():
    """vLLM's CPU backend took 20.29 of 23.54 GiB for its KV cache; our 5 GB L2 asked for more than the host
    had left: it shrinks (here to nothing), with the setting to change, instead of the kernel killing the
    worker."""
    cfg = CacheConfig(max_local_cpu_size="5GB")
    plan = plan_memory(cfg, torch.device("cpu"), host_available=int(1.6 * GiB),
                       reserved_by="vLLM's KV cache (20.29 GiB on this worker)", knobs="lower VLLM_CPU_KVCACHE_SPACE")
    assert plan.l2_bytes == 0
    assert "after vLLM's KV cache (20.29 GiB on this worker)" in plan.notes[0]
    assert "lower VLLM_CPU_KVCACHE_SPACE" in plan.notes[0]


def test_bad_worker_count():
    with pytest.raises(ValueError, match="workers"):
        plan_memory(CacheConfig(), torch.device("cpu"), workers=0)


def test_engine_takes_its_tiers_at_start_up_within_the_real_host_figure():
    """An engine with a KV spec allocates its arenas at construction (the memory is taken now), never more
    than the host has available; a tier the budget leaves smaller than one chunk is not built."""
    spec = KVSpec("m", "float32", "staging", 2, 2, 2, 8, 16)
    chunk = 2 * 2 * 16 * 2 * 8 * 4
    e = CacheEngine(CacheConfig(chunk_size=16, max_local_cpu_size=f"{64 * chunk}B"), spec=spec, device="cpu")
    (l2,) = e.tiers.memory
    assert l2.name == "L2" and l2.usage().capacity_bytes == 64 * chunk
    e.close()
    huge = CacheConfig(chunk_size=16, max_local_cpu_size=f"{host_available_bytes() * 4}B")
    plan = plan_memory(huge, torch.device("cpu"))  # the real figure, read now (not allocated: it is most of RAM)
    assert plan.l2_bytes <= host_available_bytes() - 2 * GiB and plan.notes
    tiny = CacheEngine(CacheConfig(chunk_size=16, max_local_cpu_size=f"{chunk - 1}B"), spec=spec, device="cpu")
    assert tiny.tiers.memory == []
    tiny.close()
