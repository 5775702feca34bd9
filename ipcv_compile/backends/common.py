"""What the lowering backends share — the result type, the errors, ``torch.export`` with the
project's dynamic-dim rules, the dims that stayed dynamic, a module's artifact metadata and fixed
inputs — below both :mod:`ipcv_compile.lower` (which dispatches to the backends) and the backends
(which import only this), so neither imports the other back.  Re-exported by
:mod:`ipcv_compile.lower`, where users import them from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import fx, nn

__all__ = [
    "Lowered",
    "LoweringError",
    "BackendUnavailable",
    "auto_dynamic_shapes",
    "graph_dynamic_shapes",
    "export_program",
    "dynamic_dims",
    "symbol_names",
    "graph_of",
    "module_metadata",
    "keyword_inputs",
    "check_fixed_inputs",
    "default_artifact_path",
]


class LoweringError(RuntimeError):
    """A backend could not lower the module (the message says why and what to do)."""


class BackendUnavailable(LoweringError):
    """The backend's package or device is missing (e.g. torch-tensorrt, CUDA)."""


@dataclass
class Lowered:
    """A lowered module: call it like the original (``lowered(*example_inputs)``).

    Attributes:
        backend: the backend name.
        module: the callable that runs (GraphModule, compiled module, onnxruntime wrapper, ...).
        artifact: the file written (onnx / pt2 / tensorrt), else None.
        dynamic_dims: ``{input name: {dim: symbol}}`` of the dims that stayed dynamic in the export
            (empty for eager / inductor, and for a fully static export).
        info: backend-specific details (export seconds, providers, engines, ...).
    """

    backend: str
    module: Callable
    artifact: Optional[str] = None
    dynamic_dims: Dict[str, Dict[int, str]] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
def graph_of(module: nn.Module) -> nn.Module:
    """The runnable graph inside an :class:`ipcv_compile.IPCVModule` (its ``graph_module``), else
    ``module`` itself."""
    gm = getattr(module, "graph_module", None)
    if isinstance(gm, fx.GraphModule):
        return gm
    return module


def auto_dynamic_shapes(args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None):
    """``Dim.AUTO`` on every dim of every tensor input (None for other inputs), in the structure
    ``torch.export`` expects: a tuple for positional inputs, or a dict when there are kwargs."""
    from torch.export import Dim

    def spec(t):
        if isinstance(t, torch.Tensor):
            return {i: Dim.AUTO for i in range(t.dim())} or None
        return None

    a = tuple(spec(t) for t in args)
    if not kwargs:
        return a
    return {"args": a, **{k: spec(v) for k, v in kwargs.items()}}


def graph_dynamic_shapes(gm: fx.GraphModule, args: Sequence[Any]):
    """``Dim.AUTO`` on the input dims that are symbolic in a captured / rewritten graph's placeholder
    metadata (the dims it was captured dynamic in), static elsewhere; None when the graph has no
    usable metadata or takes keyword inputs."""
    from torch.export import Dim

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(args):
        return None
    specs = []
    for n, a in zip(phs, args):
        v = n.meta.get("val")
        if not isinstance(a, torch.Tensor):
            specs.append(None)
            continue
        if not isinstance(v, torch.Tensor) or v.dim() != a.dim():
            return None
        d = {i: Dim.AUTO for i, s in enumerate(v.shape) if not _is_static(s)}
        specs.append(d or None)
    return tuple(specs)


def _is_static(s) -> bool:
    if isinstance(s, int):
        return True
    node = getattr(s, "node", None)
    return node is not None and getattr(node.expr, "is_number", False)


def export_program(module: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None, *,
                   dynamic: bool = True, dynamic_shapes=None, decompose: bool = True) -> "torch.export.ExportedProgram":
    """``torch.export.export`` (non-strict) of ``module`` (an IPCVModule's graph is used directly).

    Dynamic dims (unless ``dynamic=False`` or ``dynamic_shapes`` is given): for a captured /
    rewritten GraphModule, the dims symbolic in its input metadata (:func:`graph_dynamic_shapes`);
    for any other module, ``Dim.AUTO`` on every dim (:func:`auto_dynamic_shapes`).  ``Dim.AUTO``
    lets export specialise what the graph fixes (e.g. a packed layout's token count).

    ``decompose``: the named ``ipcv.*`` nodes (kept by ``torch.export``) are lowered to the ATen
    ops they run (:func:`ipcv_compile.ops.decompositions`; every other op stays as exported), so the
    program — and any artifact saved from it — needs no ipcv to run."""
    from .. import ops

    m = graph_of(module)
    kwargs = dict(kwargs or {})
    if dynamic_shapes is None and dynamic and callable(getattr(m, "ipcv_dynamic_shapes", None)):
        dynamic_shapes = m.ipcv_dynamic_shapes(args)  # the module says what its export serves
        if kwargs:  # by name; its keyword inputs (keyword_inputs) are static
            import inspect

            names = list(inspect.signature(m.forward).parameters)
            dynamic_shapes = {**{names[i]: s for i, s in enumerate(dynamic_shapes)}, **{k: None for k in kwargs}}
    if dynamic_shapes is None and dynamic:
        if isinstance(m, fx.GraphModule) and not kwargs:
            dynamic_shapes = graph_dynamic_shapes(m, args)
        if dynamic_shapes is None:
            dynamic_shapes = auto_dynamic_shapes(args, kwargs)
        if kwargs:  # export wants kwargs' specs by name, positional ones as a tuple under their names
            import inspect

            names = list(inspect.signature(m.forward).parameters)
            pos = dynamic_shapes.pop("args")
            dynamic_shapes = {**{names[i]: s for i, s in enumerate(pos)}, **dynamic_shapes}
    try:
        with torch.no_grad():
            ep = torch.export.export(m, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            if decompose and ops.has_ipcv_ops(ep.graph):
                try:
                    ep = ep.run_decompositions(ops.decompositions())
                except Exception as e:
                    if "lifted_tensor" not in str(e):
                        raise
                    ep = _export_through_impls(ep, args, kwargs, dynamic_shapes)
        return ep
    except Exception as e:  # pragma: no cover - message enrichment only
        raise LoweringError(f"torch.export failed for {type(m).__name__}: {type(e).__name__}: {e}") from e


def _export_through_impls(ep, args, kwargs, dynamic_shapes):
    """The program with every ``ipcv.*`` node replaced by the Python function it runs, exported
    again.  ``run_decompositions`` cannot lift tensors an op's implementation builds from Python data
    (the patch-grid tables of the grid-aware variants: "Constant tensor lifted_tensor_0 is not in the
    constants dictionary"); export's own tracing lifts them as constants.

    The first program's own constants (e.g. a packed layout's position tables) come back from
    ``ep.module()`` as plain attributes named ``lifted_tensor_N``; torch (2.13) names the newly lifted
    ones ``lifted_tensor_N`` too without checking those, so two constants would share one name (one
    value silently replaced, and ONNX decomposition fails: "lifted_tensor_1 is not a buffer").  They
    are moved to names the generator cannot produce first."""
    from .. import ops

    m = ep.module()
    impls = ops.decompositions()
    named = {id(t) for t in m.parameters()} | {id(t) for t in m.buffers()}
    moved: Dict[str, str] = {}
    for n in m.graph.nodes:
        if n.op == "call_function" and n.target in impls:
            n.target = impls[n.target]
        if n.op != "get_attr":
            continue
        if n.target not in moved:
            *path, leaf = n.target.split(".")
            owner = m.get_submodule(".".join(path))
            val = getattr(owner, leaf)
            if not isinstance(val, torch.Tensor) or id(val) in named:
                continue
            new = f"ipcv_constant_{len(moved)}"
            while hasattr(m, new):
                new += "_"
            setattr(m, new, val)
            delattr(owner, leaf)
            moved[n.target] = new
        n.target = moved[n.target]
    m.recompile()
    return torch.export.export(m, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def dynamic_dims(ep: "torch.export.ExportedProgram", names: Optional[Dict[str, Dict[int, str]]] = None
                 ) -> Dict[str, Dict[int, str]]:
    """Which user-input dims of ``ep`` are symbolic: ``{input name: {dim: name}}``, the name from
    ``names`` (the module's ``ipcv_dim_names``, e.g. ``"batch"``) or else the export's symbol."""
    user = set(ep.graph_signature.user_inputs)
    out: Dict[str, Dict[int, str]] = {}
    for n in ep.graph.nodes:
        if n.op != "placeholder" or n.name not in user:
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            human = (names or {}).get(n.name, {})
            d = {i: human.get(i, str(s)) for i, s in enumerate(v.shape) if not _is_static(s)}
            if d:
                out[n.name] = d
    return out


def symbol_names(ep: "torch.export.ExportedProgram", names: Optional[Dict[str, Dict[int, str]]]) -> Dict[str, str]:
    """``{export symbol: human name}`` for the input dims ``names`` covers (plain symbols only)."""
    out: Dict[str, str] = {}
    user = set(ep.graph_signature.user_inputs)
    for n in ep.graph.nodes:
        if n.op != "placeholder" or n.name not in user or not names or n.name not in names:
            continue
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        for i, s in enumerate(v.shape):
            expr = getattr(getattr(s, "node", None), "expr", None)
            if expr is not None and getattr(expr, "is_Symbol", False) and i in names[n.name]:
                out.setdefault(str(expr), names[n.name][i])
    return out


# --------------------------------------------------------------------------------------------- metadata
def module_metadata(module: nn.Module) -> Dict[str, Any]:
    """What a module says about the artifact made from it (``module.ipcv_metadata()``, e.g.
    ``ipcv_adapters.export.TowerForExport``: the inputs fixed for the file, the IPCV config, ...);
    ``{}`` when it says nothing.  Written into ONNX ``metadata_props["ipcv"]`` / the pt2 extra file
    ``ipcv.json`` and read back by :func:`ipcv_compile.backends.artifacts.load_artifact`."""
    fn = getattr(graph_of(module), "ipcv_metadata", None)
    return dict(fn()) if callable(fn) else {}


def keyword_inputs(module: nn.Module) -> Dict[str, Any]:
    """Keyword inputs a file made from ``module`` takes as graph inputs after its positional ones
    (``module.ipcv_keyword_inputs()``, e.g. a packed tower's ``grid_thw``, which its graph checks
    against the layout it was built for); ``{}`` when it names none.  The onnx / pt2 backends export
    with them (ONNX inputs by name; a ``.pt2`` program called ``m(*args, name=...)``)."""
    fn = getattr(graph_of(module), "ipcv_keyword_inputs", None)
    return dict(fn()) if callable(fn) else {}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        a = a.tolist()
    if isinstance(b, torch.Tensor):
        b = b.tolist()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_fixed_inputs(metadata: Dict[str, Any], given: Dict[str, Any], where: str) -> None:
    """The keyword inputs of a call of an artifact against the ones it was exported for
    (``metadata["fixed_inputs"]``): each must be given and equal; no other keyword is accepted.
    A packed layout's file, for instance, is for one ``grid_thw``: the same patch count in another
    layout would run and return wrong numbers, so the loader refuses it."""
    fixed = dict(metadata.get("fixed_inputs") or {})
    unknown = sorted(set(given) - set(fixed))
    if unknown:
        raise TypeError(f"{where} takes no keyword input(s) {unknown}"
                        + (f" (it was exported for {fixed})" if fixed else ""))
    for name, want in fixed.items():
        if name not in given:
            raise TypeError(f"{where} was exported for {name}={want} only; pass {name}=... with every call so "
                            f"the loader can check it (a bare onnxruntime / torch.export session cannot)")
        got = given[name]
        if not _same(got, want):
            got_s = got.tolist() if isinstance(got, torch.Tensor) else got
            raise ValueError(f"{where} was exported for {name}={want}, but this call has {name}={got_s}: "
                             f"export one file per {name}")


def default_artifact_path(backend: str, suffix: str) -> str:
    import tempfile

    d = tempfile.mkdtemp(prefix=f"ipcv-{backend}-")
    return os.path.join(d, f"model{suffix}")
