"""How much memory the memory tiers may take: what the configuration asks for, capped by what the machine has
left once the serving engine (vLLM) has taken its own share. A cache that is sized on top of vLLM's
reservation gets its worker OOM-killed by the kernel; one sized inside it only serves fewer hits.

Host memory (L2, and L1 when the engine's device is the CPU):
- `max_local_cpu_size` (and `max_device_cache_size` of a CPU L1) are per node: with W worker processes of one
  serving instance on the node (TP x PP ranks), each worker's tier gets 1/W of it. Every rank stores its own
  slice of every chunk, so the node holds as many chunks as one worker with the whole size would.
- Each worker's share is capped at 1/W of what the OS reports available (`MemAvailable`, read after vLLM
  allocated its KV cache) minus `host_memory_headroom`.
Device memory (L1 on a GPU): `max_device_cache_size`, else `max_gpu_cache_ratio` x total device memory,
capped at the free device memory (read after vLLM allocated its KV cache) minus `device_memory_headroom`.

Every cap that bites is said in one line naming what to change. `plan_memory` takes the figures as arguments,
so tests inject them; `host_available_bytes` and `device_memory` read the real ones.
"""

import os
from dataclasses import dataclass

import torch

from .config import CacheConfig

GiB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    l1_bytes: int  # 0: no L1
    l2_bytes: int  # 0: no L2
    notes: tuple[str, ...] = ()  # one line per tier the budget shrank

    def describe(self) -> str:
        return f"L1 {_gb(self.l1_bytes) if self.l1_bytes else 'off'}, L2 {_gb(self.l2_bytes) if self.l2_bytes else 'off'}"


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def host_available_bytes() -> int:
    """Host memory the kernel can hand out without swapping or killing: MemAvailable of /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, as the driver reports them now."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def plan_memory(cfg: CacheConfig, device: torch.device, *, workers: int = 1, host_available: int | None = None,
                device_free_total: tuple[int, int] | None = None, reserved_by: str = "the serving engine",
                knobs: str = "") -> MemoryPlan:
    """L1 and L2 sizes for one worker of `workers` on this node.

    host_available: bytes the OS can still hand out (default: read now); device_free_total: (free, total)
    of the CUDA device (default: read now when `device` is CUDA). reserved_by: who took the rest, for the
    message ("vLLM's KV cache (20.3 GiB)"); knobs: the outside settings that give the cache more room
    ("lower VLLM_CPU_KVCACHE_SPACE")."""
    if workers < 1:
        raise ValueError(f"workers: expected >= 1 worker processes on the node, got {workers}")
    device = torch.device(device)
    notes: list[str] = []
    host_asked = {"L2": int(cfg.max_local_cpu_size) // workers}
    l1 = 0
    if device.type == "cuda":
        free, total = device_free_total if device_free_total is not None else device_memory(device)
        asked = int(cfg.max_device_cache_size) if cfg.max_device_cache_size else int(cfg.max_gpu_cache_ratio * total)
        room = max(0, free - int(cfg.device_memory_headroom))
        l1 = min(asked, room)
        if l1 < asked:
            setting = "max_device_cache_size" if cfg.max_device_cache_size else "max_gpu_cache_ratio"
            notes.append(f"L1: asked {_gb(asked)} ({setting}), {_gb(free)} free on {device} after {reserved_by}, "
                         f"{_gb(int(cfg.device_memory_headroom))} kept free (device_memory_headroom): L1 = "
                         f"{_gb(l1)}; {knobs or 'free device memory'} to give it more, or ask for less ({setting})")
    elif cfg.max_device_cache_size:
        host_asked = {"L1": int(cfg.max_device_cache_size) // workers, **host_asked}
    wanted = sum(host_asked.values())
    sizes = dict(host_asked)
    if wanted:
        available = host_available if host_available is not None else host_available_bytes()
        room = max(0, available - int(cfg.host_memory_headroom)) // workers
        if wanted > room:  # shrink every host tier by the same factor
            sizes = {name: asked * room // wanted for name, asked in host_asked.items()}
            per = f" per worker ({workers} on this node)" if workers > 1 else ""
            for name, asked in host_asked.items():
                setting = "max_local_cpu_size" if name == "L2" else "max_device_cache_size"
                notes.append(f"{name}: asked {_gb(asked)}{per}, {_gb(available)} of host memory available after "
                             f"{reserved_by}, {_gb(int(cfg.host_memory_headroom))} kept free "
                             f"(host_memory_headroom): {name} = {_gb(sizes[name])}; "
                             f"{knobs or 'free host memory'} to give it more, or ask for less ({setting})")
    return MemoryPlan(sizes.get("L1", l1), sizes["L2"], tuple(notes))
