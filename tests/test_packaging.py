"""Our top-level `kernels` shares its import name with HuggingFace's `kernels`: transformers must still work."""

import subprocess
import sys

import pytest

CHILD = """
import kernels
from transformers.utils.import_utils import _is_package_available, is_kernels_available
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
available, version = _is_package_available("kernels", return_version=True)
assert available and version == "{version}", (available, version)
assert not is_kernels_available(), "transformers takes our kernels for HuggingFace's"
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
print("ok")
"""


def test_transformers_imports_beside_our_kernels_package():
    pytest.importorskip("transformers")
    from importlib.metadata import version

    ours = version("lmcache-core")
    assert not ours.startswith("0.17."), "0.17.x is the range transformers takes for HuggingFace's kernels"
    out = subprocess.run([sys.executable, "-c", CHILD.format(version=ours)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
