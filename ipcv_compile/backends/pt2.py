"""``pt2``: ``torch.export`` -> ``torch.export.save`` (a ``.pt2`` archive) -> ``torch.export.load``.

The rewritten graph's inserted ops are Python functions over ATen; export traces through them, so
the archive holds ATen ops only and loads without ipcv installed.  The exporting module's metadata
(``ipcv_metadata()``: e.g. the layout a packed file is for) is stored as the extra file
``ipcv.json``; :func:`load_pt2` checks calls against it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict

import torch

from .common import (Lowered, check_fixed_inputs, default_artifact_path, dynamic_dims, export_program, graph_of,
                     keyword_inputs, module_metadata)

METADATA_FILE = "ipcv.json"


class Pt2Module:
    """A loaded ``.pt2`` archive, called like the exported module (``module``: the runnable
    ``torch.export.load(path).module()``; ``metadata``: its ``ipcv.json``); keyword arguments of a call
    are checked against the file's ``fixed_inputs`` (:func:`ipcv_compile.lower.check_fixed_inputs`)
    and passed to the program where it takes them (a packed file's ``grid_thw``, checked again inside
    the graph)."""

    def __init__(self, path: str):
        extra = {METADATA_FILE: ""}
        self.path = path
        self.program = torch.export.load(path, extra_files=extra)
        self.module = self.program.module()
        self.metadata: Dict[str, Any] = json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else {}
        self.keyword_inputs = _keyword_names(self.program)

    def __call__(self, *args, **fixed):
        check_fixed_inputs(self.metadata, fixed, os.path.basename(self.path))
        return self.module(*args, **{k: v for k, v in fixed.items() if k in self.keyword_inputs})

    def __repr__(self) -> str:
        return f"Pt2Module({self.path!r})"


def _keyword_names(program) -> tuple:
    """The keyword inputs of an exported program (``torch.export``'s input spec: ``(args, kwargs)``)."""
    try:
        spec = program.call_spec.in_spec
        kw_spec = spec.child(1) if hasattr(spec, "child") else spec.children_specs[1]
        return tuple(kw_spec.context or ())
    except Exception:  # another spec layout: no keyword inputs passed
        return ()


def load_pt2(path: str) -> Pt2Module:
    """The runnable module of a saved ``.pt2`` archive, with its metadata check (:class:`Pt2Module`)."""
    return Pt2Module(path)


def lower_pt2(module, example_inputs, *, example_kwargs=None, path=None, dynamic=True, dynamic_shapes=None, **opts):
    if opts:
        raise TypeError(f"pt2 backend takes no options, got {sorted(opts)}")
    t0 = time.perf_counter()
    kwargs = {**keyword_inputs(module), **(example_kwargs or {})}  # e.g. a packed file's grid_thw
    ep = export_program(module, example_inputs, kwargs or None, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    t_export = time.perf_counter() - t0
    path = path or default_artifact_path("pt2", ".pt2")
    meta = module_metadata(module)
    torch.export.save(ep, path, extra_files={METADATA_FILE: json.dumps(meta, sort_keys=True)} if meta else None)
    loaded = load_pt2(path)
    return Lowered("pt2", loaded, artifact=path,
                   dynamic_dims=dynamic_dims(ep, getattr(graph_of(module), "ipcv_dim_names", None)),
                   info={"export_s": t_export, "range_constraints": {str(k): str(v) for k, v in ep.range_constraints.items()}})
