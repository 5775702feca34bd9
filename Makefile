# Set-up is done by the targets themselves: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ipcv-installed

$(STAMP): pyproject.toml scripts/setup_env.sh
	PY=$(PY) bash scripts/setup_env.sh
	touch $(STAMP)

.PHONY: setup demo test bench
setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ipcv_adapters.app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run
