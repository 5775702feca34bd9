"""One module per lowering backend; each exposes ``lower_<name>(module, example_inputs, **opts) -> Lowered``.

Imported lazily by :func:`get` (so optional dependencies — onnx, onnxruntime, torch-tensorrt — are
imported only when their backend is used), each by a plain ``from .<name> import`` that the
architecture test sees.  What the backends share lives in :mod:`.common`, which imports none of
them and not :mod:`ipcv_compile.lower` (that one imports this package to dispatch).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["BACKENDS", "get"]

BACKENDS = ("eager", "inductor", "onnx", "pt2", "tensorrt")


def get(name: str) -> Callable:
    """``lower_<name>`` of backend ``name`` (one of :data:`BACKENDS`), its module imported now."""
    if name == "eager":
        from .eager import lower_eager as fn
    elif name == "inductor":
        from .inductor import lower_inductor as fn
    elif name == "onnx":
        from .onnx import lower_onnx as fn
    elif name == "pt2":
        from .pt2 import lower_pt2 as fn
    elif name == "tensorrt":
        from .tensorrt import lower_tensorrt as fn
    else:
        raise ValueError(f"unknown backend {name!r}; one of {', '.join(BACKENDS)}")
    return fn
