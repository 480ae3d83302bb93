"""One pipeline stage's worker cache in a process of its own (no vLLM: the real RankCache, engine and lookup
server), for test_pp_ranks.py:

    python -m tests.connectors.rank_main SOCKET PP_RANK CHUNKS DISK_DIR READY_FILE

Builds a stage of a 4-layer model (2 layers per stage), stores the first CHUNKS chunks of a fixed prompt
through the Saver from synthetic paged caches (as a step's saves would), writes READY_FILE, then answers
lookups until it is terminated.
"""

import os
import signal
import sys
import threading

import torch

from connectors.plan import SaveSpec, StepPlan, slots_for
from connectors.rank_cache import RankCache
from kernels import KVLayout, chunk_hashes
from lmcache_core import CacheConfig, CacheEngine, KVSpec
from lmcache_core.budget import MemoryPlan

CHUNK, BLOCK, HEADS, DIM, LAYERS_PER_STAGE = 16, 16, 2, 8, 2
PROMPT = list(range(1000, 1000 + 8 * CHUNK))


def spec(pp_rank: int) -> KVSpec:
    return KVSpec("tiny@rev", "float32", "flash_attn", LAYERS_PER_STAGE, 2, HEADS, DIM, CHUNK, pp_rank=pp_rank,
                  pp_size=2, first_layer=pp_rank * LAYERS_PER_STAGE)


def main(socket: str, pp_rank: str, chunks: str, disk_dir: str, ready: str) -> None:
    pp, n = int(pp_rank), int(chunks)
    cfg = CacheConfig(chunk_size=CHUNK, local_cache_dir=disk_dir, max_local_cpu_size="1MB")
    engine = CacheEngine(cfg, spec=spec(pp), device="cpu", memory=MemoryPlan(0, 2**20))
    torch.manual_seed(pp)  # each stage's layers hold different KV
    caches = [torch.randn(2, 16, BLOCK, HEADS, DIM) for _ in range(LAYERS_PER_STAGE)]
    rank = RankCache(engine, caches, KVLayout.from_name("flash_attn"), block_size=BLOCK, socket=socket,
                     lead=pp == 0, layerwise=False)
    if n:
        hashes = chunk_hashes(PROMPT[:n * CHUNK], chunk_size=CHUNK, salt=engine.salt())
        plan = StepPlan(saves=[SaveSpec("r", hashes, slots_for(list(range(8)), BLOCK, 0, n * CHUNK))])
        rank.finish_saves(plan)
        rank.saver.flush()
        engine.flush()
    open(ready, "w").close()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    rank.close()


if __name__ == "__main__":
    main(*sys.argv[1:6])
    os._exit(0)
