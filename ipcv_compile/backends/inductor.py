"""``inductor``: ``torch.compile(..., backend="inductor", fullgraph=True)`` — a graph break is an
error, not a silent fallback.

``via="export"`` (default): the rewritten graph is first exported (``torch.export``, dynamic dims as
captured) and the ATen-level ``ExportedProgram.module()`` is compiled.  Dynamo then sees ATen ops
only — the same program the onnx / pt2 backends ship — and never re-traces the Python of the
inserted IPCV ops (their static configuration handling is not dynamo's business).
``via="graph"``: compile the rewritten GraphModule itself (dynamo traces into the inserted ops).
"""

from __future__ import annotations

import time

import torch

from .common import Lowered, LoweringError, export_program, graph_of


def compile_target(module, example_inputs, *, via: str = "export", dynamic: bool = True, dynamic_shapes=None,
                   example_kwargs=None):
    """What :func:`lower_inductor` hands to ``torch.compile`` (also used by tests with
    ``torch._dynamo.explain``)."""
    if via == "export":
        return export_program(module, example_inputs, example_kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes).module()
    if via == "graph":
        return graph_of(module)
    raise ValueError(f"via must be 'export' or 'graph', got {via!r}")


def lower_inductor(module, example_inputs, *, example_kwargs=None, path=None, dynamic=True, dynamic_shapes=None,
                   mode=None, via: str = "export", warmup: bool = True, **opts):
    """Compile with inductor; ``warmup`` runs the example inputs once so the compile happens here
    (not on the first real call).  ``dynamic=True`` compiles one graph with symbolic sizes."""
    t0 = time.perf_counter()
    target = compile_target(module, example_inputs, via=via, dynamic=dynamic, dynamic_shapes=dynamic_shapes,
                            example_kwargs=example_kwargs)
    info = {"mode": mode, "dynamic": dynamic, "via": via, "export_s": time.perf_counter() - t0}
    compiled = torch.compile(target, backend="inductor", fullgraph=True, dynamic=dynamic, mode=mode, **opts)
    if warmup:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                compiled(*example_inputs, **(example_kwargs or {}))
        except Exception as e:
            raise LoweringError(f"inductor compilation failed ({via=}): {type(e).__name__}: {e}") from e
        info["compile_s"] = time.perf_counter() - t0
    return Lowered("inductor", compiled, info=info)
