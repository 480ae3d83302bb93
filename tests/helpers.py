"""Assertions shared by the tests: they print where two tensors first differ."""

import os

import torch

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Where the Triton kernels run in the tests: the GPU when there is one (scripts/device_check.sh), else the
# CPU under Triton's interpreter. Tests of a kernel put its inputs here; CPU-only paths stay on the CPU.
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements reinterpreted as same-size integers (NaN payloads and -0.0 compare as bits)."""
    return t.contiguous().view(_SAME_SIZE_INT[t.element_size()])


def assert_bytes_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = as_bytes(actual).cpu(), as_bytes(expected).cpu()
    if torch.equal(a, e):
        return
    bad = (a != e).nonzero()
    first = [tuple(i.tolist()) for i in bad[:5]]
    raise AssertionError(
        f"{what}: {bad.shape[0]} of {a.numel()} elements differ; first at {first}: "
        f"actual {[actual[i].item() for i in first]} expected {[expected[i].item() for i in first]}"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = "tensor"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.float().cpu(), expected.float().cpu()
    bad = ((a - e).abs() > atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    if not bad.any():
        return
    idx = bad.nonzero()
    first = [tuple(i.tolist()) for i in idx[:5]]
    raise AssertionError(
        f"{what}: {idx.shape[0]} of {a.numel()} elements outside atol={atol} rtol={rtol}; first at {first}: "
        f"actual {[a[i].item() for i in first]} expected {[e[i].item() for i in first]}"
    )


# shared/ sits beside the repository (as in CI); SHARED_DIR points elsewhere (the GPU machine gets a copy).
SHARED_DIR = os.environ.get("SHARED_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared")
REAL_KV_FILE = os.path.join(SHARED_DIR, "data", "smollm2_135m_kv_512.safetensors")


def real_kv() -> torch.Tensor:
    """512 tokens of SmolLM2-135M's real KV, `[L=30, 2, T=512, H=3, D=64]` bf16 (post-RoPE K), from the
    shared/ folder that sits beside the repository (as in CI)."""
    from safetensors.torch import load_file

    assert os.path.exists(REAL_KV_FILE), (f"{REAL_KV_FILE} is missing: shared/ must sit beside the repository "
                                          "(or SHARED_DIR name a copy)")
    return load_file(REAL_KV_FILE)["kv"]
