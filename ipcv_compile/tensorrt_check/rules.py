"""The rule chain of :func:`~ipcv_compile.tensorrt_check.tensorrt_check`: one small function per rule.

Every ``call_function`` node goes through :data:`RULES` in order.  A rule takes ``(node, context)``
and returns a :class:`Verdict`, or ``None`` when it does not decide (the next rule is asked).  A
verdict is a *problem* (the node would not convert), a *warning*, *handled-by-lowering* (removed,
folded or decomposed by torch-tensorrt's lowering; ``reason`` is the ``handled_by_lowering`` key) or
*allowed*.  A verdict with ``final=False`` is recorded and the chain goes on (an unbacked output is
a problem wherever it comes from; an attention mask is a warning on an op that still converts).
The last rule, :func:`no_converter`, always decides.

Rules only read the node and the tables in :mod:`.converters`; the one thing they record directly is
the TopK list (``context.topk``).  The loop (``check._check_graph``) turns verdicts into
:class:`~ipcv_compile.tensorrt_check.Finding` objects and counts every node in ``report.ops``
under :func:`op_key`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import fx

from .converters import (
    CONVERTER_OPS,
    DATA_DEPENDENT_OPS,
    FACTORY_OPS,
    HIGHER_ORDER_UNSUPPORTED,
    REDUCING_SCATTERS,
    REMOVED_BY_LOWERING,
    TRT_OWN_DECOMPOSED,
    _op_name,
)

PROBLEM = "problem"
WARNING = "warning"
HANDLED = "handled-by-lowering"
ALLOWED = "allowed"


@dataclass(frozen=True)
class Verdict:
    kind: str  # PROBLEM | WARNING | HANDLED | ALLOWED
    reason: str = ""  # the finding's text; for HANDLED, the handled_by_lowering key
    op: Optional[str] = None  # the finding's op (None: the node's op name)
    final: bool = True  # False: record it and ask the next rule


ALLOW = Verdict(ALLOWED)


def problem(reason: str, op: Optional[str] = None, final: bool = True) -> Verdict:
    return Verdict(PROBLEM, reason, op, final)


def handled(key: str) -> Verdict:
    return Verdict(HANDLED, key)


@dataclass
class RuleContext:
    """What rules need besides the node: the TopK limit, the report's TopK list, and the names of
    the ops torch-tensorrt's decomposition table decomposes (a callable: built only when asked)."""

    max_k: int
    topk: List[Tuple[str, Any]]
    decomposed_names: Callable[[], frozenset]


Rule = Callable[[fx.Node, RuleContext], Optional[Verdict]]


# ------------------------------------------------------------------------------------ helpers
def op_key(n: fx.Node) -> str:
    """The ``report.ops`` key of a node: its op name (``getitem`` for ``operator.getitem``)."""
    return "getitem" if n.target is operator.getitem else _op_name(n.target)


def _aten_base(name: str) -> str:
    return f"aten.{name.split('.')[0]}"


def _unbacked(val) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        if isinstance(val, (list, tuple)):
            return any(_unbacked(v) for v in val)
        if isinstance(val, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
            return bool(free_unbacked_symbols(val))
    except Exception:  # pragma: no cover - meta of unusual types
        return False
    return False


def _static_int(x) -> Optional[int]:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    return None


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _dim_size(src, dim) -> Any:
    v = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    d = dim % max(v.dim(), 1)
    return v.shape[d]


# ------------------------------------------------------------------------------------ rules
def higher_order_op(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``torch.cond`` / ``while_loop`` / ``map`` / ``scan`` (any higher-order op): no converter."""
    t = n.target
    if not isinstance(t, torch._ops.HigherOrderOperator):
        return None
    why = HIGHER_ORDER_UNSUPPORTED.get(t.name(), f"higher-order op {t.name()} has no TensorRT converter")
    return problem(why, op=f"torch.{t.name()}" if t.name() in ("cond", "while_loop") else None)


def data_dependent_op(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``nonzero``, ``masked_select``, ``.item()``, ``unique``, ...: data-dependent output shapes."""
    name = _op_name(n.target)
    if name not in DATA_DEPENDENT_OPS:
        return None
    return problem(DATA_DEPENDENT_OPS[name] + " (TensorRT needs static shapes; no data-dependent output shapes)",
                   op=_aten_base(name))


def unbacked_output(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """An unbacked symbol in ``meta["val"]``, reported where it first appears (not at every later
    use).  Not final: the node's op is still checked."""
    if _unbacked(n.meta.get("val")) and not any(_unbacked(a.meta.get("val")) for a in n.all_input_nodes):
        return problem("output shape depends on tensor data (unbacked symbol in meta['val'])", final=False)
    return None


def getitem(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``operator.getitem`` (tuple outputs): evaluated by torch-tensorrt."""
    return ALLOW if n.target is operator.getitem else None


def python_scalar_op(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """Python-level sym ops (``operator.mul`` on SymInts, ``math``, ``torch.sym_*``): evaluated at
    conversion."""
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return None
    mod = getattr(t, "__module__", "") or ""
    if mod in ("_operator", "operator", "math") or _op_name(t).startswith("torch.sym_") \
            or mod.startswith("torch.fx.experimental"):
        return ALLOW
    return None


def not_aten(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """Any other non-OpOverload target: the graph is not an exported ATen graph."""
    if isinstance(n.target, torch._ops.OpOverload):
        return None
    return problem("not an ATen op: export the module first (tensorrt_check(module, example_inputs=...))")


def topk_limit(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``topk``: ``k`` must be a static int ``<= max_k`` (3840).  Records every TopK's ``k``."""
    if _op_name(n.target) != "topk.default":
        return None
    k = _static_int(_arg(n, 1, "k"))
    ctx.topk.append((n.name, k if k is not None else _arg(n, 1, "k")))
    if k is None:
        return problem("k is not a static int (TensorRT TopK needs a constant k; build one engine per token "
                       "count: export with static shapes)", op="aten.topk")
    if k > ctx.max_k:
        return problem(f"k={k} exceeds TensorRT's TopK limit of {ctx.max_k} (fewer tokens per segment, or split "
                       "the selection)", op="aten.topk")
    return ALLOW


def sort_limit(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``sort`` (a TopK over the whole dim): the dim must be static and ``<= max_k``."""
    if _op_name(n.target) not in ("sort.default", "sort.stable"):
        return None
    s = _static_int(_dim_size(n.args[0], _arg(n, 1, "dim", -1)))
    if s is None:
        return problem("sort over a dimension that is not static", op="aten.sort")
    if s > ctx.max_k:
        return problem(f"sort over {s} elements exceeds TensorRT's TopK limit of {ctx.max_k}", op="aten.sort")
    return ALLOW


def reducing_scatter(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``scatter(reduce=)``, ``scatter_add``, ``scatter_reduce``, ``index_reduce``, ...: TensorRT's
    scatter layers have no reduction."""
    name = _op_name(n.target)
    if name not in REDUCING_SCATTERS:
        return None
    return problem(f"{REDUCING_SCATTERS[name]}: TensorRT scatter layers have no reduction", op=_aten_base(name))


def index_put_accumulate(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``index_put(..., accumulate=True)``: ScatterND has no reduction."""
    if _op_name(n.target) == "index_put.default" and bool(_arg(n, 3, "accumulate", False)):
        return problem("index_put with accumulate=True: TensorRT ScatterND has no reduction", op="aten.index_put")
    return None


def boolean_index(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``index`` / ``index_put`` with a boolean mask index: data-dependent shape (nonzero)."""
    name = _op_name(n.target)
    if name not in ("index.Tensor", "index_put.default"):
        return None
    idx = _arg(n, 1, "indices") or []
    if any(isinstance(i, fx.Node) and isinstance(i.meta.get("val"), torch.Tensor)
           and i.meta["val"].dtype == torch.bool for i in idx):
        return problem("boolean-mask indexing (data-dependent shape; uses nonzero)", op=_aten_base(name))
    return None


def masked_attention(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """SDPA with a mask converts through IAttentionLayer from torch-tensorrt 2.13 on: a warning, not
    final (the op is still looked up)."""
    if _op_name(n.target) == "scaled_dot_product_attention.default" and isinstance(_arg(n, 3, "attn_mask"), fx.Node):
        return Verdict(WARNING, "attention with a mask: IAttentionLayer in torch-tensorrt >= 2.13 (older "
                                "releases decompose it, decompose_attention=True)", final=False)
    return None


def has_converter(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """In torch-tensorrt 2.13's converter registry (:data:`CONVERTER_OPS`)."""
    return ALLOW if _op_name(n.target) in CONVERTER_OPS else None


def removed_by_lowering(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """torch-tensorrt's own replacement decompositions, or erased by its lowering passes."""
    name = _op_name(n.target)
    return handled(name) if name in TRT_OWN_DECOMPOSED or name in REMOVED_BY_LOWERING else None


_FACTORY_BASES = ("empty", "zeros", "ones", "full", "arange", "eye", "linspace")


def constant_folded_factory(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """Factory ops with static arguments: folded by torch-tensorrt's ``constant_fold`` pass."""
    name = _op_name(n.target)
    if name in FACTORY_OPS or (not any(isinstance(a, fx.Node) for a in n.all_input_nodes)
                               and name.split(".")[0] in _FACTORY_BASES):
        return handled(name)
    return None


def functionalized_inplace(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """An in-place op whose out-of-place form converts: ``run_decompositions`` functionalizes it."""
    name = _op_name(n.target)
    base, _, ovl = name.partition(".")
    if base.endswith("_") and f"{base[:-1]}.{ovl}" in (CONVERTER_OPS | TRT_OWN_DECOMPOSED | ctx.decomposed_names()):
        return handled(name + " (functionalized)")
    return None


def to_copy(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """``aten.to.*``: torch.export's ``run_decompositions`` turns it into ``_to_copy`` (converter)."""
    name = _op_name(n.target)
    return handled(name + " (-> _to_copy)") if name.partition(".")[0] == "to" else None


def decomposed_by_trt(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """In torch-tensorrt's decomposition table (a graph checked before decomposition)."""
    name = _op_name(n.target)
    return handled(name + " (decomposed)") if name in ctx.decomposed_names() else None


def no_converter(n: fx.Node, ctx: RuleContext) -> Optional[Verdict]:
    """Everything left: no converter and not removed by the lowering.  Always decides."""
    return problem("no torch-tensorrt converter (torch-tensorrt 2.13 aten_ops_converters.py) and not removed by its "
                   "lowering", op=f"aten.{_op_name(n.target)}")


RULES: Tuple[Rule, ...] = (
    higher_order_op,
    data_dependent_op,
    unbacked_output,
    getitem,
    python_scalar_op,
    not_aten,
    topk_limit,
    sort_limit,
    reducing_scatter,
    index_put_accumulate,
    boolean_index,
    masked_attention,
    has_converter,
    removed_by_lowering,
    constant_folded_factory,
    functionalized_inplace,
    to_copy,
    decomposed_by_trt,
    no_converter,
)
