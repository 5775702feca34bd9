"""Loading a saved artifact (``.onnx`` / ``.pt2`` written by :func:`ipcv_compile.lower`) as a
callable that checks each call against the inputs the file was exported for.

Kept apart from the backends' shared :mod:`.common` (it imports the onnx / pt2 backends lazily)."""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["load_artifact"]


def load_artifact(path: str, **options) -> Callable:
    """Load an ``.onnx`` or ``.pt2`` file written by :func:`ipcv_compile.lower`, as a callable that checks each call's
    keyword inputs against the ones recorded in the file (:func:`ipcv_compile.lower.check_fixed_inputs`)::

        m = load_artifact("qwen.onnx")
        last, pooled = m(pixel_values, grid_thw=grid_thw)   # raises for another layout

    ``options`` go to the runner (onnx: ``providers``, ``threads``)."""
    if path.endswith(".onnx"):
        from .onnx import OnnxRuntimeModule

        return OnnxRuntimeModule(path, **options)
    if path.endswith(".pt2"):
        from .pt2 import load_pt2

        if options:
            raise TypeError(f"pt2 artifacts take no load options, got {sorted(options)}")
        return load_pt2(path)
    raise ValueError(f"load_artifact: unknown artifact type {os.path.basename(path)!r} (expected .onnx or .pt2; "
                     "TensorRT .ep files load with torch.export.load after import torch_tensorrt)")
