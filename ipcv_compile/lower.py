"""Lowering a rewritten graph (or any module) to a backend: ``lower(module, backend, example_inputs)``.

Backends (one file each in :mod:`ipcv_compile.backends`):

``eager``     the rewritten GraphModule as it is.
``inductor``  ``torch.compile(graph, fullgraph=True, dynamic=True)`` (no graph breaks allowed).
``onnx``      ``torch.export`` (dynamic dims where the graph allows them) -> ``torch.onnx.export``
              (dynamo) -> a ``.onnx`` file, run by :class:`~ipcv_compile.backends.onnx.OnnxRuntimeModule`
              (an onnxruntime session with the module's call convention).
``pt2``       ``torch.export`` -> ``torch.export.save`` -> ``torch.export.load(...).module()``.
``tensorrt``  torch-tensorrt's dynamo path: static-shape ``torch.export`` per input shape,
              :func:`~ipcv_compile.tensorrt_check.tensorrt_check`, ``torch_tensorrt.dynamo.compile``;
              one engine per static input shape (TopK needs a constant ``k``).

Dynamic dims: by default every dim of every tensor input is ``Dim.AUTO``; ``torch.export`` keeps the
ones the graph allows dynamic (token count and batch of a batched layout) and specialises the rest
(feature dims; all token dims of a packed layout, whose per-segment keep counts are baked in).
``Lowered.dynamic_dims`` says which stayed dynamic.

Whole towers (patch embedding -> rewritten blocks -> final norm / merger) are made exportable by
the adapters (``ipcv_adapters.export.TowerForExport``); this module lowers any module it is given.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from torch import nn

from .backends import BACKENDS, get as _backend
from .backends import common as _common
# the backends' shared types and helpers, importable from here as before
from .backends.common import (BackendUnavailable, Lowered, LoweringError, auto_dynamic_shapes, check_fixed_inputs,
                              default_artifact_path, dynamic_dims, export_program, graph_dynamic_shapes, graph_of,
                              keyword_inputs, module_metadata, symbol_names)

__all__ = ["lower", "BACKENDS", *_common.__all__]


def lower(module: nn.Module, backend: str, example_inputs: Sequence[Any], *,
          example_kwargs: Optional[Dict[str, Any]] = None, path: Optional[str] = None,
          dynamic: bool = True, dynamic_shapes=None, **options) -> Lowered:
    """Lower ``module`` (an :class:`ipcv_compile.IPCVModule`, a GraphModule or any ``nn.Module``;
    e.g. ``ipcv_adapters.export.TowerForExport``) to ``backend``.

    Args:
        backend: one of :data:`BACKENDS`.
        example_inputs: positional inputs for export / compilation / warm-up.
        path: where ``onnx`` / ``pt2`` / ``tensorrt`` write their artifact (default: a temporary
            directory kept for the life of the process).
        dynamic: export / compile with dynamic dims where the graph allows them (ignored by
            ``tensorrt``: one static engine per input shape).
        options: backend options (``inductor``: ``mode``; ``onnx``: ``providers``, ``threads``,
            ``optimize``; ``tensorrt``: ``precision``, ``check``, and torch-tensorrt compile options).
    """
    fn = _backend(backend)
    return fn(module, tuple(example_inputs), example_kwargs=example_kwargs, path=path, dynamic=dynamic,
              dynamic_shapes=dynamic_shapes, **options)
