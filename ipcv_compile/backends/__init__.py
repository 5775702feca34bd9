"""One module per lowering backend; each exposes ``lower_<name>(module, example_inputs, **opts) -> Lowered``.

Imported lazily by :func:`ipcv_compile.lower`, so optional dependencies (onnx, onnxruntime,
torch-tensorrt) are imported only when their backend is used.
"""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["get"]


def get(name: str) -> Callable:
    mod = importlib.import_module(f"{__name__}.{name}")
    return getattr(mod, f"lower_{name}")
