"""Every environment variable that `kernels/` reads, read here and nowhere else.

| variable | values | effect |
|---|---|---|
| TRITON_INTERPRET | 0 / 1 | 1 runs the Triton kernels on CPU tensors under Triton's interpreter (tests) |
| LMCACHE_KERNEL_BACKEND | auto / triton / torch | auto: Triton on CUDA tensors (or under the interpreter), else the torch reference |
"""

import os

import torch

_BACKENDS = ("auto", "triton", "torch")


def interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_backend() -> str:
    backend = os.environ.get("LMCACHE_KERNEL_BACKEND", "auto").strip().lower()
    if backend not in _BACKENDS:
        raise ValueError(f"LMCACHE_KERNEL_BACKEND: expected one of {_BACKENDS}, got {backend!r}")
    return backend


def use_triton(t: torch.Tensor, backend: str | None = None) -> bool:
    """Whether a launcher should run its Triton kernel on tensors living where `t` lives.

    backend: "auto", "triton" (fail loudly when Triton cannot run) or "torch"; None reads
    LMCACHE_KERNEL_BACKEND.
    """
    backend = kernel_backend() if backend is None else backend
    runnable = t.is_cuda or interpret_enabled()
    if backend == "torch":
        return False
    if backend == "triton" and not runnable:
        raise RuntimeError(
            "the Triton backend was asked for, but the tensors are on "
            f"{t.device} and TRITON_INTERPRET is not 1: Triton needs CUDA tensors or the interpreter"
        )
    return runnable
