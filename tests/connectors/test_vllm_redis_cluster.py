"""Across instances through a real Redis Cluster: instance A (its own process) computes and stores, instance B
(this process; L2 smaller than a chunk, no disk: nothing local) loads everything from Redis."""

import json
import os
import subprocess
import sys

import pytest

from tests.connectors.prompts import CROSS
from tests.connectors.vllm_helpers import Output, assert_same_outputs, connector_totals, expected_hit, make_llm, run, shutdown

CHUNK = 128
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("mode", [{}, {"async_load": False}], ids=["background-load", "synchronous-load"])
def test_instance_b_loads_what_instance_a_stored(tiny_model, reference, redis_cluster, redis_cluster_client,
                                                 tmp_path, mode):
    url = "redis-cluster://" + ",".join(f"{n.host}:{n.port}" for n in redis_cluster.masters())
    out = tmp_path / "a.json"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    a = subprocess.run([sys.executable, "-m", "tests.connectors.instance_main", tiny_model, "cross",
                        json.dumps({"chunk_size": CHUNK, "remote_url": url}), str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, f"instance A failed:\n{a.stderr[-4000:]}"
    result = json.loads(out.read_text())
    stored = [k for k in redis_cluster_client.scan_iter("lmc:v1:*")]
    full_chunks = sum(len(p) // CHUNK for p in CROSS)
    assert len(stored) == full_chunks == result["totals"]["stored_tokens"] // CHUNK

    llm = make_llm(tiny_model, {"chunk_size": CHUNK, "remote_url": url, "max_local_cpu_size": "64KB", **mode})
    try:
        got = run(llm, CROSS)
        loaded = connector_totals(llm).get("loaded_tokens", 0)
    finally:
        shutdown(llm)
    from_a = [Output(tuple(t), tuple(lp), n) for t, lp, n in result["outputs"]]
    assert_same_outputs(reference["cross"], from_a, "instance A")
    assert_same_outputs(reference["cross"], got, "instance B")
    expected = [expected_hit(len(p), CHUNK) for p in CROSS]
    assert [o.num_cached_tokens for o in got] == expected
    assert loaded == sum(expected) > 0
