"""`python -m bench.kernels` end to end on a small shape, beside LMCache (the peer library, installed by
`make test` in its own folder, named by PEER_LMCACHE_DIR). The benchmark checks LMCache's gather byte for
byte against ours before timing it, so this also checks our transfer against an independent implementation."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def test_kernel_benchmark_runs_beside_lmcache(tmp_path):
    peer = os.environ.get("PEER_LMCACHE_DIR")
    if not peer:
        pytest.skip("PEER_LMCACHE_DIR unset: `make test` installs LMCache and names its folder")
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, "-m", "bench.kernels", "--layers", "2", "--cache-tokens", "1024", "--tokens", "200",
           "--block-sizes", "16", "--layouts", "flash_attn,flashinfer,flash_attn_hnd", "--orders",
           "blocks,shuffled", "--repeats", "2", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(peer)}
    env.pop("TRITON_INTERPRET", None)  # the CPU production path, as users run it
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["layout"], r["order"]): r for r in report["rows"]}
    assert set(rows) == {(name, order) for name in ("flash_attn", "flashinfer", "flash_attn_hnd")
                         for order in ("blocks", "shuffled")}
    for (name, order), row in rows.items():
        assert row["gather_GBps"] > 0 and row["scatter_GBps"] > 0 and row["copy_GBps"] > 0, (name, order)
        if name == "flash_attn_hnd":  # LMCache's CPU fallback has no HND layouts
            assert "lmcache_gather_GBps" not in row
        else:
            assert row["lmcache_gather_GBps"] > 0 and row["lmcache_scatter_GBps"] > 0, (name, order)
    assert any("lmcache cannot move flash_attn_hnd" in note for note in report["notes"]), report["notes"]
