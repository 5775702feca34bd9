"""Start-up hook of the extra venvs (.venv-vllm, .venv-eval; copied into their site-packages with a
.pth line by scripts/setup_vllm.sh and scripts/setup_eval.sh). The registry's torchvision is a CUDA
build whose native ops do not load on a CPU-only machine; its Python code registers fake kernels for
torchvision::nms / qnms at import and fails if the schemas do not exist. When torchvision is first
imported (not before: no cost for other programs), define the two schemas, with no kernel, so its
pure-Python transforms import (transformers' video processors, lmms-eval use them). Calling nms would
raise; nothing on the vLLM / lmms-eval / ipcv paths does."""
import sys

_KEEP = []  # the torch.library.Library must stay alive, or its definitions go with it


class _DefineTorchvisionSchemas:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            try:
                import torch

                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _KEEP.append(lib)
            except Exception:  # defined already (a working torchvision build): nothing to do
                pass
        return None  # the normal finders import it


sys.meta_path.insert(0, _DefineTorchvisionSchemas())
