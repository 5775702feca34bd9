#!/usr/bin/env bash
# Creates .venv and installs ipcv with its dev extras.
# torch is installed FIRST and pinned to the CPU build (torch==2.13.0): with no torch present, pip
# would resolve the bare "torch" requirement to the newest CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, transformers; print('ipcv env: torch', torch.__version__, '| transformers', transformers.__version__)"
