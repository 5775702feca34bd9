#!/usr/bin/env bash
# Creates .venv-eval: lmms-eval (the IPCV / DART / VisionZip papers' harness) with this project installed
# editable into it, for tests_eval/ (`make test-eval`).  A venv of its own because lmms-eval pulls in
# torchvision, and the registry's torchvision is a CUDA build whose native ops do not load on a CPU-only
# machine ("operator torchvision::nms does not exist"), which would break transformers' image processors
# in the main .venv.  Here a start-up hook (.pth) defines the torchvision::nms / qnms schemas with
# torch.library before torchvision is imported, so its pure-Python transforms import (nothing here calls
# nms); torchaudio / torchcodec, when pulled in, fail to load their native libraries and are removed.
# torch is pinned to the CPU build on this machine's disk at every step (never let pip replace it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
V=.venv-eval
LMMS_EVAL_VERSION=${LMMS_EVAL_VERSION:-0.7.3}
[ -x $V/bin/python ] || "$PY" -m venv $V
$V/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
$V/bin/python -m pip install -q "torch==2.13.0"
$V/bin/python -m pip install -q -e ".[eval]" "lmms-eval==${LMMS_EVAL_VERSION}" "torch==2.13.0" \
    "pytest>=8" "tokenizers" "safetensors>=0.4" "pillow>=10"
# lmms-eval's Qwen2-VL / Qwen2.5-VL wrappers import decord (its video reader) unconditionally
$V/bin/python -m pip install -q decord "torch==2.13.0"
# lmms-eval 0.7.3 patches filelock._api, which filelock 4 no longer has
$V/bin/python -m pip install -q "filelock<4" "torch==2.13.0"
$V/bin/python -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
site=$($V/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# the torchvision start-up hook (see scripts/torchvision_cpu_shim.py), imported by a .pth line
cp scripts/torchvision_cpu_shim.py "$site/_ipcv_torchvision_cpu_shim.py"
echo "import _ipcv_torchvision_cpu_shim" > "$site/_ipcv_torchvision_cpu_shim.pth"
$V/bin/python -c "import lmms_eval, torch, transformers, torchvision, ipcv_adapters.eval; from importlib.metadata import version; print('eval env: lmms-eval', version('lmms-eval'), '| torch', torch.__version__, '| transformers', transformers.__version__)"
