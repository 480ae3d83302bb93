import os

# Triton reads TRITON_INTERPRET when it is imported: set it before any test module imports kernels.
# On a machine with a GPU the kernels run natively unless the caller set it.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import random

import numpy as np
import pytest

from tests.helpers import DEVICE


@pytest.fixture(autouse=True)
def _seed_rngs():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE
