#!/usr/bin/env bash
# The one prepared run for a lent GPU machine: `python -m bench.kernels` and the kernel tests on the device
# (no interpreter), everything under $OUT. Here first: `make device-prep`; then the device tool's
# run with carry [".device"] and command `bash scripts/device_check.sh` (about 5 minutes; timeout_s 560).
# That machine has its own torch and Triton (2.11 / 3.6 when this was written), pytest and hypothesis, and
# no registry: zstandard and LMCache (the baseline) come as wheels from .device/wheels, the shared test data
# from .device/shared.
set -uo pipefail
OUT=${OUT:-results/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl && export PYTHONPATH=/tmp/site
export SHARED_DIR="$PWD/.device/shared" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
# The figures first (each configuration is checked against the torch reference before it is timed), then
# the kernel tests, whose Triton tests put their tensors on the GPU (tests/helpers.py DEVICE).
timeout 200 python3 -m bench.kernels --output "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
# Triton compiles a kernel per constexpr combination: 8 workers share that (pytest-xdist is on that machine).
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 300 python3 -m pytest -q -p no:cacheprovider $workers tests/kernels 2>&1 | tee "$OUT/pytest.txt" | tail -40
