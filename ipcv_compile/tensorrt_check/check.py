"""``tensorrt_check``: run the rule chain (:mod:`.rules`) over an exported ATen graph and report.

Also the decomposition table torch-tensorrt 2.13 applies before converting
(:func:`trt_decomposition_table`), the decomposition ipcv applies itself before handing a program to
torch-tensorrt (:func:`prepare_for_tensorrt`) and the static-shape export used for modules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from . import rules as _rules
from .converters import (
    IPCV_TRT_PREP_DECOMPOSITIONS,
    TRT_DISABLED_DECOMPOSITIONS,
    TRT_ENABLED_TORCH_DECOMPOSITIONS,
    TRT_OWN_DECOMPOSED,
    TRT_TOPK_MAX_K,
    _op_name,
    _resolve,
)

__all__ = [
    "tensorrt_check",
    "TensorRTReport",
    "Finding",
    "TensorRTCheckError",
    "trt_decomposition_table",
    "prepare_for_tensorrt",
]


def _ipcv_prep_table() -> Dict[Any, Any]:
    """What ipcv's TensorRT path decomposes itself before torch-tensorrt: the ops of
    :data:`IPCV_TRT_PREP_DECOMPOSITIONS` (``baddbmm``) and ipcv's own ops (``torch.ops.ipcv.*``,
    :func:`ipcv_compile.ops.decompositions`), which torch-tensorrt's table does not touch."""
    from torch._decomp import get_decompositions

    from .. import ops

    table: Dict[Any, Any] = dict(get_decompositions([op for n in IPCV_TRT_PREP_DECOMPOSITIONS for op in _resolve(n)]))
    table.update(ops.decompositions())
    return table


def trt_decomposition_table() -> Dict[Any, Any]:
    """The decomposition table torch-tensorrt 2.13 applies (``get_decompositions()`` with default
    settings), minus its own replacement decompositions (their ops are allowed as they are), plus
    the ops ipcv's TensorRT path decomposes itself (:func:`_ipcv_prep_table`)."""
    from torch._decomp import get_decompositions
    from torch._export.utils import _collect_all_valid_cia_ops_for_aten_namespace, _get_decomp_for_cia

    enabled = [op for n in TRT_ENABLED_TORCH_DECOMPOSITIONS for op in _resolve(n)]
    table: Dict[Any, Any] = dict(get_decompositions(enabled))
    for op in _collect_all_valid_cia_ops_for_aten_namespace():
        if _op_name(op) not in TRT_DISABLED_DECOMPOSITIONS:
            table[op] = _get_decomp_for_cia(op)
    table.update(_ipcv_prep_table())
    for op in list(table):
        n = _op_name(op)
        if n in TRT_OWN_DECOMPOSED or n in TRT_DISABLED_DECOMPOSITIONS:
            del table[op]
    return table


def prepare_for_tensorrt(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """Decompose the ops ipcv handles before torch-tensorrt (``baddbmm`` -> ``bmm`` + ``add``;
    ``torch.ops.ipcv.*`` -> ATen): the program given to ``torch_tensorrt.dynamo.compile`` then has
    only ops it converts."""
    table = _ipcv_prep_table()
    present = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    if not present.intersection(table):
        return ep
    return ep.run_decompositions(table)


# ---------------------------------------------------------------------------------------------
@dataclass
class Finding:
    node: str
    op: str
    reason: str
    block: Optional[int] = None

    def __str__(self) -> str:
        where = f" (block {self.block})" if self.block is not None else ""
        return f"{self.node}{where}: {self.op}: {self.reason}"


@dataclass
class TensorRTReport:
    """Result of :func:`tensorrt_check`.  ``ok`` is True when there is no problem."""

    problems: List[Finding] = field(default_factory=list)
    warnings: List[Finding] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)  # op name -> count, after decomposition
    handled_by_lowering: Counter = field(default_factory=Counter)  # allowed via lowering / folding
    topk: List[Tuple[str, Any]] = field(default_factory=list)  # (node, k)
    input_shapes: List[Tuple[int, ...]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unsupported_ops(self) -> List[str]:
        return sorted({p.op for p in self.problems})

    def raise_if_failed(self) -> "TensorRTReport":
        if not self.ok:
            raise TensorRTCheckError(self)
        return self

    def format(self) -> str:
        head = "TensorRT check: OK" if self.ok else f"TensorRT check: FAILED ({len(self.problems)} problem(s))"
        lines = [head]
        if self.input_shapes:
            lines.append(f"static input shapes: {self.input_shapes}")
        lines.append(f"{sum(self.ops.values())} ops after torch-tensorrt's decompositions, {len(self.ops)} kinds")
        if self.topk:
            lines.append("topk: " + ", ".join(f"{n} k={k}" for n, k in self.topk) + f" (limit {TRT_TOPK_MAX_K})")
        if self.handled_by_lowering:
            lines.append("handled by torch-tensorrt lowering / constant folding: "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(self.handled_by_lowering.items())))
        for p in self.problems:
            lines.append(f"  PROBLEM {p}")
        groups: Dict[Tuple[str, str], List[str]] = {}
        for w in self.warnings:
            groups.setdefault((w.op, w.reason), []).append(w.node)
        for (op, reason), nodes in groups.items():
            where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes ({', '.join(nodes[:4])}{', ...' if len(nodes) > 4 else ''})"
            lines.append(f"  warning {where}: {op}: {reason}")
        return "\n".join(lines)

    __str__ = format


class TensorRTCheckError(RuntimeError):
    def __init__(self, report: TensorRTReport):
        self.report = report
        super().__init__(report.format())


# ---------------------------------------------------------------------------------------------
def _block_of(n: fx.Node) -> Optional[int]:
    """The block a node belongs to, for the report; None when it is in no indexed module.

    ``node.meta["ipcv"]["block"]`` (set by :func:`ipcv_compile.locate`) when present; otherwise the
    index of the last ``<name>.<digits>`` pair in the innermost ``nn_module_stack`` path — the
    position in whatever ModuleList holds the blocks (``blocks.3.attn``, ``encoder.layer.3.mlp``,
    ``encoder.stages.3.attn`` -> 3), with no module name assumed.  A numbered child inside a block
    (an ``nn.Sequential`` MLP's ``mlp.net.2``) would be taken for the block index: only
    ``meta["ipcv"]`` is exact.
    """
    info = n.meta.get("ipcv") or {}
    if "block" in info:
        return info["block"]
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    parts = str(list(stack.values())[-1][0]).split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit():
            return int(parts[i])
    return None


def _check_graph(gm: fx.GraphModule, report: TensorRTReport, max_k: int) -> None:
    """Ask :data:`rules.RULES` about every ``call_function`` node, in order, until one decides."""
    ctx = _rules.RuleContext(max_k=max_k, topk=report.topk, decomposed_names=_decomposed_names)
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = _op_name(n.target)
        blk = _block_of(n)
        report.ops[_rules.op_key(n)] += 1
        for rule in _rules.RULES:
            verdict = rule(n, ctx)
            if verdict is None:
                continue
            if verdict.kind in (_rules.PROBLEM, _rules.WARNING):
                found = report.problems if verdict.kind == _rules.PROBLEM else report.warnings
                found.append(Finding(n.name, verdict.op or name, verdict.reason, blk))
            elif verdict.kind == _rules.HANDLED:
                report.handled_by_lowering[verdict.reason] += 1
            if verdict.final:
                break


_DECOMPOSED: Optional[frozenset] = None


def _decomposed_names() -> frozenset:
    """Names of the ops :func:`trt_decomposition_table` decomposes (cached)."""
    global _DECOMPOSED
    if _DECOMPOSED is None:
        _DECOMPOSED = frozenset(_op_name(op) for op in trt_decomposition_table())
    return _DECOMPOSED


def _export_static(module: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]]):
    if hasattr(module, "graph_module") and isinstance(getattr(module, "graph_module"), fx.GraphModule):
        module = module.graph_module  # IPCVModule
    with torch.no_grad():
        return torch.export.export(module, tuple(args), dict(kwargs or {}), strict=False)


def tensorrt_check(
    program: Any,
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    example_kwargs: Optional[Dict[str, Any]] = None,
    decompose: bool = True,
    max_topk: int = TRT_TOPK_MAX_K,
) -> TensorRTReport:
    """Check that torch-tensorrt can convert ``program`` into TensorRT engines with static shapes.

    Args:
        program: an ``ExportedProgram``; or an ATen-level ``fx.GraphModule`` (checked as it is);
            or any ``nn.Module`` / :class:`ipcv_compile.IPCVModule` together with
            ``example_inputs``, exported here with static shapes (one TensorRT engine per shape).
        decompose: apply torch-tensorrt 2.13's decomposition table first (default; what
            ``torch_tensorrt.dynamo.compile`` does).  Needs an ``ExportedProgram`` (or inputs).
        max_topk: TensorRT's TopK limit (3840).
    Returns:
        a :class:`TensorRTReport` (``report.ok``, ``report.problems`` naming node and op).
    """
    report = TensorRTReport()
    ep = None
    if isinstance(program, torch.export.ExportedProgram):
        ep = program
    elif isinstance(program, fx.GraphModule) and example_inputs is None:
        _check_graph(program, report, max_topk)
        return report
    elif isinstance(program, nn.Module):
        if example_inputs is None:
            raise ValueError("tensorrt_check: give example_inputs to export this module with static shapes")
        ep = _export_static(program, example_inputs, example_kwargs)
    else:
        raise TypeError(f"tensorrt_check: expected an ExportedProgram, GraphModule or nn.Module, got {type(program)}")
    user = set(ep.graph_signature.user_inputs)
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in user and isinstance(n.meta.get("val"), torch.Tensor):
            shape = tuple(n.meta["val"].shape)
            report.input_shapes.append(tuple(int(s) if isinstance(s, int) else str(s) for s in shape))
            if any(not isinstance(s, int) for s in shape):
                report.warnings.append(Finding(n.name, "input", f"dynamic input shape {shape}: ipcv builds one TensorRT "
                                               "engine per static shape (export with static shapes)"))
    if decompose:
        ep = ep.run_decompositions(trt_decomposition_table())
    _check_graph(ep.graph_module, report, max_topk)
    return report
