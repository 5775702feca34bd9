"""``onnx``: ``torch.export`` (dynamic dims where the graph allows them) -> ``torch.onnx.export``
(dynamo exporter) -> a ``.onnx`` file -> :class:`OnnxRuntimeModule`.

The rewritten graph lowers to standard ONNX ops (TopK with a dynamic K, CumSum, ScatterElements,
GatherElements, ...); see ``/work/shared/notes/export-facts.md``.  Inputs that are ``None`` in the
example (e.g. an absent mask) are not graph inputs: the wrapper drops them at call time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, List, Optional, Sequence

import torch

from .common import (Lowered, LoweringError, check_fixed_inputs, default_artifact_path, dynamic_dims, export_program,
                     graph_of, keyword_inputs, module_metadata, symbol_names)

METADATA_KEY = "ipcv"  # metadata_props key of the exporting module's JSON metadata (module_metadata)

_EXTERNAL_DATA_BYTES = 1_800_000_000  # ONNX protobuf limit is 2 GB: larger models keep weights beside


class OnnxRuntimeModule:
    """An onnxruntime session called like the exported module: positional torch tensors in, torch
    tensors out (same structure as the module's output when ``out_spec`` is known, else a single
    tensor or a tuple).

    Args:
        path: the ``.onnx`` file.
        input_positions: which positional arguments are graph inputs (default: every tensor argument,
            in order).
        providers: onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        threads: intra-op threads (default: onnxruntime's choice).

    The file's ``ipcv`` metadata (written by :func:`lower_onnx` from the module's ``ipcv_metadata()``)
    is in :attr:`metadata`; keyword arguments of a call are checked against its ``fixed_inputs``
    (e.g. a packed layout's ``grid_thw``: ``m(pixel_values, grid_thw=thw)``), see
    :func:`ipcv_compile.lower.check_fixed_inputs`, and feed the graph inputs of that name (the
    inputs after the positional ones: a packed file's ``grid_thw``, checked again inside the graph).
    """

    def __init__(self, path: str, input_positions: Optional[Sequence[int]] = None, out_spec=None,
                 providers: Optional[List[str]] = None, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - dev extra installs it
            raise LoweringError("the onnx backend needs onnxruntime: pip install 'ipcv[onnx]'") from e
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        self.path = path
        self.session = ort.InferenceSession(path, so, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_positions = None if input_positions is None else list(input_positions)
        self.out_spec = out_spec
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = json.loads(raw) if raw else {}

    def _feed(self, args, keywords=None):
        if self.input_positions is None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
        else:
            tensors = [args[i] for i in self.input_positions]
        keywords = {k: v for k, v in (keywords or {}).items() if k in self.input_names[len(tensors):]}
        tensors = tensors + [keywords[n] for n in self.input_names[len(tensors):] if n in keywords]
        if len(tensors) != len(self.input_names):
            raise ValueError(f"{os.path.basename(self.path)} takes {len(self.input_names)} tensor inputs "
                             f"({self.input_names}), got {len(tensors)}")
        feed = {}
        for name, t in zip(self.input_names, tensors):
            if t.dtype == torch.bfloat16:
                raise TypeError("onnxruntime inputs cannot be bfloat16 (numpy has no bfloat16): export in float32/float16")
            feed[name] = t.detach().cpu().contiguous().numpy()
        return feed

    def __call__(self, *args, **fixed):
        check_fixed_inputs(self.metadata, fixed, os.path.basename(self.path))
        check_shape_guards(self.metadata.get("shape_guards") or (), args, os.path.basename(self.path))
        outs = [torch.from_numpy(o) for o in self.session.run(None, self._feed(args, fixed))]
        if self.out_spec is not None:
            import torch.utils._pytree as pytree

            return pytree.tree_unflatten(outs, self.out_spec)
        if self.metadata.get("outputs"):  # the exporting module returned a tuple of these
            return tuple(outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return f"OnnxRuntimeModule({self.path!r}, inputs={self.input_names}, outputs={self.output_names})"


def rename_dims(model, names) -> None:
    """Give the ONNX model's symbolic dims human names (``s77`` -> ``batch``) wherever a value's
    dim is exactly one renamed symbol (expressions of several keep the export's symbols)."""
    if not names:
        return
    import onnx_ir as ir

    def fix(v):
        shape = getattr(v, "shape", None)
        if shape is None:
            return
        dims = list(shape)
        new = [ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in names else d
               for d in dims]
        if new != dims:
            v.shape = ir.Shape(new)

    g = model.graph
    for v in list(g.inputs) + list(g.outputs):
        fix(v)
    for node in g:
        for v in node.outputs:
            fix(v)


def name_check_nodes(model, messages) -> int:
    """Rename the index nodes of the exporting module's in-graph checks (``ipcv_check_messages``:
    ``{submodule name: message}``, e.g. a packed file's layout check) to ``"<name>: <message>"``.
    ONNX has no assert op: such a check fails by indexing out of range, and onnxruntime's error names
    the failing node — so the error then says why.  Returns the number of nodes renamed."""
    if not messages:
        return 0
    renamed = 0
    for node in model.graph:
        if node.op_type not in ("Gather", "GatherND", "GatherElements"):
            continue
        scopes = str(node.metadata_props.get("pkg.torch.onnx.name_scopes", ""))
        for scope, message in messages.items():
            if f"'{scope}'" in scopes:
                node.name = f"{scope}: {message}" + ("" if renamed == 0 else f" ({renamed})")
                renamed += 1
                break
    return renamed


def _guard_namespace():
    import math

    return {"math": math, "inf": float("inf"), "max": max, "min": min, "abs": abs, "__builtins__": {}}


def shape_guards(ep: "torch.export.ExportedProgram", module, example_inputs) -> List[str]:
    """The program's shape guards as Python expressions over ``args[i]`` (the call's positional
    inputs).  ``torch.export`` records, besides each dim's range, conditions the trace assumed
    (e.g. that a prune stage removes exactly / at least as many rows as at the example: a view
    splits ``(B*R, D)`` into ``(B, R, D)`` differently when ``R == 1``); ``ep.module()`` and a
    loaded ``.pt2`` check them at every call, an ONNX file cannot, and runs the graph where they
    fail into an onnxruntime error or wrong numbers.  They go into the file's metadata and
    :class:`OnnxRuntimeModule` checks them (:func:`check_shape_guards`); a bare onnxruntime
    session does not.  Guards that are not plain arithmetic over the inputs (:func:`_safe_guard`) or
    do not evaluate on the example are left out."""
    import inspect

    codes = list(getattr(ep, "_guards_code", None) or ())  # torch >= 2.9; private: absent -> none checked
    if not codes:
        return []
    params = list(inspect.signature(graph_of(module).forward).parameters)
    out = []
    for c in codes:
        for i, name in enumerate(params[:len(example_inputs)]):
            c = c.replace(f"L['{name}']", f"args[{i}]")
        if "L[" in c:
            continue
        if not _safe_guard(c):  # only plain expressions over the inputs travel in the file
            continue
        try:
            if eval(c, _guard_namespace(), {"args": tuple(example_inputs)}) is not True:  # noqa: S307 (our own export's code)
                continue
        except Exception:
            continue
        out.append(c)
    return list(dict.fromkeys(out))  # the trace records many conditions more than once


_GUARD_NODES = ("Expression", "BoolOp", "And", "Or", "BinOp", "UnaryOp", "Compare", "Call", "Name", "Load",
                "Attribute", "Subscript", "Constant", "Tuple", "List", "Slice", "Index", "Add", "Sub", "Mult", "Div",
                "FloorDiv", "Mod", "USub", "UAdd", "Not", "Eq", "NotEq", "Lt", "LtE", "Gt", "GtE")


_GUARD_NAMES = frozenset({"args", "math", "inf", "max", "min", "abs", "True", "False"})
_GUARD_ATTRS = frozenset({"size", "shape", "floor", "ceil", "trunc"})  # no powers: a file cannot make the loader compute 9**9**9


def _safe_guard(code: str, names=_GUARD_NAMES) -> bool:
    """Is ``code`` a plain arithmetic / comparison expression over ``args`` and the sympy helpers
    (what torch.export's guards are)?  A file's metadata is data: anything else (another name or
    attribute, a lambda, a string) is never evaluated, so loading a file cannot run its code."""
    import ast

    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        kind = type(node).__name__
        if kind not in _GUARD_NODES:
            return False
        if kind == "Name" and node.id not in names:
            return False
        if kind == "Attribute" and node.attr not in _GUARD_ATTRS:
            return False
        if kind == "Constant" and not isinstance(node.value, (int, float, bool)):
            return False
    return True


def check_shape_guards(guards: Sequence[str], args: Sequence[Any], where: str) -> None:
    """Raise ``ValueError`` naming the first of the file's shape guards (:func:`shape_guards`)
    these inputs fail.  Guards that are not plain expressions over the inputs are refused, not run."""
    if not guards:
        return
    ns, loc = _guard_namespace(), {"args": tuple(args)}
    for g in guards:
        if not isinstance(g, str) or not _safe_guard(g):
            raise ValueError(f"{where}: its metadata holds a shape guard that is not a plain expression over the "
                             f"inputs ({str(g)[:120]!r}); not evaluated - was the file written by ipcv_compile.lower?")
        if not eval(g, ns, loc):  # noqa: S307 (checked by _safe_guard: arithmetic over args only)
            shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
            raise ValueError(
                f"{where} does not serve inputs of shape {shapes}: the export traced the graph under the shape "
                f"condition {g} (args = the call's inputs), which these fail. A dynamic file serves only the sizes "
                "where every such condition holds as on the export example (for IPCV: typically that each prune "
                "stage removes exactly as many tokens from a segment as at the example when that is 1, at least 2 "
                "otherwise); export at this size, or with an example from which every stage removes at least 2 "
                "tokens")


_KEEPDIM_REDUCTIONS = {
    torch.ops.aten.sum.dim_IntList: 2,  # index of the keepdim argument
    torch.ops.aten.mean.dim: 2,
    torch.ops.aten.amax.default: 2,
    torch.ops.aten.amin.default: 2,
}


def fix_empty_reductions(ep: "torch.export.ExportedProgram") -> int:
    """Work around an onnxruntime (1.31) bug: ``ReduceSum(keepdims=1)`` over an axis of an *empty*
    tensor (e.g. ``(B, 0, D)`` summed over ``D``) returns ``(B, 0, D)`` instead of ``(B, 0, 1)``, and
    the next broadcast fails ("Attempting to broadcast an axis by a dimension other than 1").  IPCV
    graphs hold such tensors when a segment removes nothing (retain 1.0: ``R = 0`` removed rows).

    Each ``keepdim=True`` reduction whose input has a statically zero dim that is not reduced has an
    empty result whatever its values, so it is replaced by ``input[..., 0:1, ...]`` along the reduced
    dim (same shape, also empty).  Returns the number of nodes replaced (the graph is recompiled)."""
    g = ep.graph_module.graph
    fixed = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in _KEEPDIM_REDUCTIONS:
            continue
        x = n.args[0]
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        v = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not keep or not isinstance(v, torch.Tensor) or dims is None:
            continue
        dims = [d % v.dim() for d in ([dims] if isinstance(dims, int) else dims)]
        empty_other = any(isinstance(s, int) and s == 0 for i, s in enumerate(v.shape) if i not in dims)
        if len(dims) != 1 or not empty_other or (isinstance(v.shape[dims[0]], int) and v.shape[dims[0]] == 0):
            continue
        with g.inserting_before(n):
            s = g.call_function(torch.ops.aten.slice.Tensor, (x, dims[0], 0, 1))
        s.meta = dict(n.meta)
        n.replace_all_uses_with(s)
        g.erase_node(n)
        fixed += 1
    if fixed:
        ep.graph_module.recompile()
    return fixed


def lower_onnx(module, example_inputs, *, example_kwargs=None, path=None, dynamic=True, dynamic_shapes=None,
               providers=None, threads=None, optimize: bool = True, opset: Optional[int] = None, **opts):
    if opts:
        raise TypeError(f"onnx backend: unknown options {sorted(opts)}")
    if example_kwargs:
        raise LoweringError("onnx backend: pass inputs positionally (example_kwargs are not supported)")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:  # pragma: no cover
        raise LoweringError("the onnx backend needs onnx, onnxscript and onnxruntime: pip install 'ipcv[onnx]'") from e
    t0 = time.perf_counter()
    kw = keyword_inputs(module)  # e.g. a packed file's grid_thw: graph inputs after the positional ones
    ep = export_program(module, example_inputs, kw, dynamic=dynamic, dynamic_shapes=dynamic_shapes)
    t_export = time.perf_counter() - t0
    n_fixed = fix_empty_reductions(ep)
    t0 = time.perf_counter()
    m = graph_of(module)
    n_out = len(ep.graph_signature.user_outputs)
    names_fn = getattr(m, "ipcv_output_names", None)
    output_names = list(names_fn(n_out)) if callable(names_fn) else None
    input_names = list(getattr(m, "ipcv_input_names", ()) or ()) or None
    if input_names is not None and len(input_names) != len(ep.graph_signature.user_inputs):
        input_names = None
    try:
        prog = torch.onnx.export(ep, tuple(example_inputs), kwargs=kw or None, dynamo=True, optimize=optimize,
                                 opset_version=opset, output_names=output_names, input_names=input_names)
    except Exception as e:
        raise LoweringError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    n_checks = name_check_nodes(prog.model, getattr(m, "ipcv_check_messages", None))
    t_onnx = time.perf_counter() - t0
    dim_names = getattr(m, "ipcv_dim_names", None)
    rename_dims(prog.model, symbol_names(ep, dim_names))
    meta = module_metadata(module)
    if meta and output_names:
        meta.setdefault("outputs", output_names)  # the loader then returns the module's tuple
    guards = shape_guards(ep, module, example_inputs)
    if guards:
        meta = dict(meta or {}, shape_guards=guards)
    if meta:
        prog.model.metadata_props[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    path = path or default_artifact_path("onnx", ".onnx")
    n_bytes = sum(v.numel() * v.element_size() for v in ep.state_dict.values())
    prog.save(path, external_data=n_bytes > _EXTERNAL_DATA_BYTES)
    positions = [i for i, a in enumerate(example_inputs) if isinstance(a, torch.Tensor)]
    rt = OnnxRuntimeModule(path, positions, out_spec=ep.call_spec.out_spec, providers=providers, threads=threads)
    if len(rt.input_names) != len(positions) + len(kw):
        raise LoweringError(f"exported ONNX graph has inputs {rt.input_names} but the example has "
                            f"{len(positions) + len(kw)} tensor inputs (an unused input was dropped?)")
    return Lowered("onnx", rt, artifact=path, dynamic_dims=dynamic_dims(ep, dim_names),
                   info={"export_s": t_export, "onnx_s": t_onnx, "inputs": rt.input_names,
                         "empty_reductions_fixed": n_fixed, "shape_guards": len(guards), "checks_named": n_checks})
