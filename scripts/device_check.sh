#!/usr/bin/env bash
# The one prepared run for a lent GPU machine: `python -m bench.kernels`, `python -m bench.transfer` and the
# kernel tests on the device (no interpreter), everything under $OUT. Here first: `make device-prep`; then the
# device tool's run with carry [".device"] and command `bash scripts/device_check.sh` (about 6 minutes;
# timeout_s 600). Arguments pick steps, e.g. `bash scripts/device_check.sh transfer` to rerun one alone
# (default: kernels transfer tests).
# That machine has its own torch and Triton (2.11 / 3.6 when this was written), pytest and hypothesis, and
# no registry: zstandard and LMCache (the baseline) come as wheels from .device/wheels, the shared test data
# from .device/shared.
set -uo pipefail
OUT=${OUT:-results/device}
steps=" ${*:-kernels transfer tests} "
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl && export PYTHONPATH=/tmp/site
export SHARED_DIR="$PWD/.device/shared" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
# The figures first (each configuration is checked against the torch reference before it is timed), then
# the kernel tests, whose Triton tests put their tensors on the GPU (tests/helpers.py DEVICE).
if [[ $steps == *" kernels "* ]]; then
  timeout 200 python3 -m bench.kernels --output "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
fi
# The connector's load and store pipeline (Loader and Saver on a real CacheEngine) beside the pinned copy_,
# bytes checked first (not yet timed on a GPU: 90 s allowed). Besides torch, triton and numpy, lmcache_core
# imports pyyaml, prometheus_client and xxhash: a missing one stops this step with "No module named ...".
if [[ $steps == *" transfer "* ]]; then
  timeout 90 python3 -m bench.transfer --output "$OUT/transfer.json" 2>&1 | tee "$OUT/transfer.txt"
fi
# Triton compiles a kernel per constexpr combination: 8 workers share that (pytest-xdist is on that machine).
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
if [[ $steps == *" tests "* ]]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider $workers tests/kernels 2>&1 | tee "$OUT/pytest.txt" | tail -40
fi
