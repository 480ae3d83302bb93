"""What the kernels run on: the Triton release `make test` asked for, and nothing beyond torch, triton and numpy.

`make test` runs tests/kernels twice: on the venv's Triton 3.9 and on Triton 3.6, the GPU machine's release
(EXPECT_TRITON_VERSION names the one each run must see). The GPU machine has no redis, zstandard or vllm.
"""

import os
import subprocess
import sys

import pytest
import triton


def test_runs_on_the_triton_release_make_test_asked_for():
    expected = os.environ.get("EXPECT_TRITON_VERSION")
    if expected is None:
        pytest.skip("EXPECT_TRITON_VERSION unset: run outside `make test` (a GPU machine, a developer's pytest)")
    assert triton.__version__ == expected, f"triton {triton.__version__} imported, `make test` asked for {expected}"


CHILD = """
import importlib.abc, pkgutil, sys
THIRD_PARTY = {"redis", "hiredis", "zstandard", "yaml", "prometheus_client", "vllm", "safetensors",
               "transformers", "lmcache_core", "connectors", "bench"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in THIRD_PARTY:
            raise ImportError(f"kernels imported {name}: only torch, triton and numpy may be needed")
sys.meta_path.insert(0, Refuse())
import kernels
for mod in pkgutil.iter_modules(kernels.__path__):
    __import__(f"kernels.{mod.name}")
import torch
from kernels import KVLayout, gather_kv, scatter_kv, kv_checksum, chunk_hashes, quantize_kv, dequantize_kv
layout = KVLayout.from_name("flash_attn")
caches = [torch.randn(2, 4, 16, 2, 8) for _ in range(2)]
slots = torch.tensor([3, 17, -1, 40])
staging = gather_kv(caches, slots, layout)
scatter_kv(staging, caches, slots, layout)
print("ok")
"""


def test_kernels_import_with_torch_triton_and_numpy_alone():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
