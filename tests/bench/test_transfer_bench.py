"""`python -m bench.transfer`: it runs where the GPU machine runs it (no vLLM, no zstandard, no redis client
needed), reports every figure, and its byte checks run and can fail."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.join(os.path.dirname(__file__), "..", "..")

# A child interpreter where the packages the GPU machine lacks cannot be imported.
REFUSE = """
import importlib.abc, runpy, sys
ABSENT = {"vllm", "zstandard", "redis", "hiredis"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ImportError(f"{name} imported: the GPU machine has none")
sys.meta_path.insert(0, Refuse())
"""


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU production path, as the benchmark runs it
    return subprocess.run([sys.executable, "-c", REFUSE + code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_imports_without_vllm_zstandard_or_redis():
    done = _child("import bench.transfer, connectors.loads, connectors.saves, connectors.plan, "
                  "connectors.device_streams\nprint(sorted(m for m in sys.modules if m.partition('.')[0] in ABSENT))")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_quick_run_reports_every_figure_after_its_byte_checks(tmp_path):
    out = tmp_path / "transfer.json"
    done = _child("sys.argv[0] = 'bench.transfer'\nrunpy.run_module('bench.transfer', run_name='__main__')",
                  "--quick", "--device", "cpu", "--output", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["name"] == "transfer" and report["machine"]["git_sha"] and report["machine"]["torch"]
    cfg = report["config"]
    assert (cfg["layers"], cfg["tokens"], cfg["device_resolved"]) == (4, 512, "cpu") and cfg["compute_dim"] >= 64
    rows = {r["op"]: r for r in report["rows"]}
    assert set(rows) == {"load", "store"}
    nbytes = 4 * 2 * 512 * 8 * 128 * 2  # layers, K/V, tokens, heads, head dim, bf16
    for op, row in rows.items():
        assert row["checked"] is True, op
        assert row["MB"] == nbytes / 1e6, op
        for key in ("GBps", "copy_GBps", "vs_copy", "alone_s", "compute_s", "together_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (op, key, row[key])
        assert math.isfinite(row["hidden"]), op
        assert row["hidden"] == pytest.approx((row["alone_s"] + row["compute_s"] - row["together_s"]) / row["alone_s"])
        for name, t in row["timings"].items():
            assert t["repeats"] == 3 and t["p20_s"] <= t["median_s"] <= t["p80_s"] and t["warmup_s"] > 0, name
    assert any(f"{cfg['compute_dim']}x{cfg['compute_dim']} matmul" in n for n in report["notes"]), report["notes"]


def test_load_check_fails_when_the_blocks_get_other_bytes():
    from bench.transfer import Config, _Rig

    rig = _Rig(Config(layers=2, heads=2, head_dim=16, tokens=64, chunk_size=32, block_size=16), torch.device("cpu"))
    try:
        assert rig.check() == {"load_bytes_equal": True, "store_bytes_equal": True}
        rig.chunks[1, 0, 40, 1, 3] += 1  # what the check expects is no longer what the engine holds
        with pytest.raises(AssertionError, match="load: the blocks do not hold the chunks' bytes"):
            rig.check()
    finally:
        rig.close()
