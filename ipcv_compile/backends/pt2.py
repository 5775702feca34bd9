"""``pt2``: ``torch.export`` -> ``torch.export.save`` (a ``.pt2`` archive) -> ``torch.export.load``.

The rewritten graph's inserted ops are Python functions over ATen; export traces through them, so
the archive holds ATen ops only and loads without ipcv installed.
"""

from __future__ import annotations

import time

import torch

from ..lower import Lowered, default_artifact_path, dynamic_dims, export_program


def load_pt2(path: str):
    """The runnable module of a saved ``.pt2`` archive (``torch.export.load(path).module()``)."""
    return torch.export.load(path).module()


def lower_pt2(module, example_inputs, *, example_kwargs=None, path=None, dynamic=True, dynamic_shapes=None, **opts):
    if opts:
        raise TypeError(f"pt2 backend takes no options, got {sorted(opts)}")
    t0 = time.perf_counter()
    ep = export_program(module, example_inputs, example_kwargs, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    t_export = time.perf_counter() - t0
    path = path or default_artifact_path("pt2", ".pt2")
    torch.export.save(ep, path)
    loaded = load_pt2(path)
    return Lowered("pt2", loaded, artifact=path, dynamic_dims=dynamic_dims(ep),
                   info={"export_s": t_export, "range_constraints": {str(k): str(v) for k, v in ep.range_constraints.items()}})
