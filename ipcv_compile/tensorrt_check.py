"""Will torch-tensorrt convert this graph?  A static check that runs without a GPU or torch-tensorrt.

``tensorrt_check(program)`` takes an ``ExportedProgram`` (or an ATen-level GraphModule, or any module
plus example inputs, which is exported with **static** shapes — TensorRT engines are built per static
shape here) and reports every node that would not become part of a TensorRT engine:

* the op has no torch-tensorrt converter and is not removed / decomposed by torch-tensorrt's lowering
  (the allowlist below, taken from the torch-tensorrt 2.13.0 sources — see "Sources");
* data-dependent output shapes: ``nonzero``, ``masked_select``, ``item`` / ``_local_scalar_dense``,
  ``unique``, boolean-mask indexing, ``torch.cond`` / ``while_loop``, and any node whose
  ``meta["val"]`` holds an unbacked symbol (TensorRT would need an output allocator, and
  ``torch.cond`` has no converter — use ``torch.where``);
* ``topk`` whose ``k`` is not a static int or exceeds 3840 (TensorRT's TopK limit); ``sort`` over a
  dimension that is not static or exceeds 3840;
* scatters with a reduction (``scatter.reduce``, ``scatter_add``, ``scatter_reduce``, ``index_put``
  with ``accumulate=True``, ``index_reduce``): TensorRT's ScatterND / ScatterElements have no reduction.

Before checking, the graph goes through the same decomposition table torch-tensorrt 2.13 builds in
``get_decompositions()`` (its list of enabled torch decompositions + every CompositeImplicitAutograd
ATen op's decomposition, minus its disabled set and the attention ops it keeps whole), reproduced
here from that table's *contents*; torch-tensorrt's own replacement decompositions
(``TORCH_TRT_DECOMPOSITIONS``) are not re-implemented: their ops are kept and allowed.  Factory ops
with static arguments (``empty``, ``zeros``, ``full``, ``arange``, ...) are allowed because
torch-tensorrt's ``constant_fold`` pass (``skip_constructors=False``) folds them.

Sources (torch-tensorrt 2.13.0 — the release matching torch 2.13 — read from the Python sources in its
PyPI wheel, i.e. the pytorch/TensorRT repository's files at that release):

* ``py/torch_tensorrt/dynamo/conversion/aten_ops_converters.py`` (``@dynamo_tensorrt_converter``
  targets; ``topk_sort_validator``: ``k`` static and ``<= 3840``; SDPA validator: masks and
  ``L_q != L_kv`` accepted by ``IAttentionLayer``); also checked against the same file at
  pytorch/TensorRT commit 8f1076616ffe7870ae72f9537e06b94e87b5c891 (older; same ops for this graph
  except SDPA, which that version converted only without a mask);
* ``py/torch_tensorrt/dynamo/conversion/ops_evaluators.py`` (``getitem``, ``detach``,
  ``empty.memory_format``), ``prims_ops_converters.py``;
* ``py/torch_tensorrt/dynamo/lowering/_decomposition_groups.py`` (``torch_enabled_decompositions``,
  ``torch_disabled_decompositions``), ``lowering/_decompositions.py`` (``TORCH_TRT_DECOMPOSITIONS``,
  ``ATTENTION_DECOMPOSITION_OPS``, ``get_decompositions``);
* ``py/torch_tensorrt/dynamo/lowering/passes/remove_assert_nodes.py`` (``_assert_scalar``,
  ``_assert_tensor_metadata`` erased), ``remove_detach.py``, ``constant_folding.py``.

Per-node capability validators that depend on dtypes or settings are not all reproduced; the
important ones for IPCV graphs (TopK/sort limits, scatter reductions, boolean indices) are.
A graph that passes should convert fully; building the engine on a GPU is the final proof
(``ipcv_compile.lower(..., "tensorrt")``).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

__all__ = [
    "tensorrt_check",
    "TensorRTReport",
    "Finding",
    "TRT_TOPK_MAX_K",
    "CONVERTER_OPS",
    "trt_decomposition_table",
    "prepare_for_tensorrt",
]

TRT_TOPK_MAX_K = 3840

# ---------------------------------------------------------------------------------------------
# Ops with a torch-tensorrt 2.13.0 converter (aten_ops_converters.py, ops_evaluators.py,
# prims_ops_converters.py).  Names as ``str(OpOverload)`` without the ``aten.`` prefix.
CONVERTER_OPS = frozenset("""
_adaptive_avg_pool2d.default _adaptive_avg_pool3d.default _cdist_forward.default _embedding_bag.default
_native_batch_norm_legit.no_stats _native_batch_norm_legit_no_training.default _pad_circular.default
_pdist_forward.default _prelu_kernel.default _reshape_copy.default _scaled_dot_product_cudnn_attention.default
_scaled_dot_product_efficient_attention.default _scaled_dot_product_flash_attention.default _softmax.default
_to_copy.default abs.default acos.default acosh.default adaptive_avg_pool1d.default adaptive_avg_pool2d.default
adaptive_avg_pool3d.default add.Scalar add.Tensor addmm.default amax.default amin.default any.default any.dim
any.dims arange.start_step argmax.default argmin.default as_strided.default asin.default asinh.default
atan.default atan2.default atanh.default avg_pool1d.default avg_pool2d.default avg_pool3d.default
batch_norm.default bitwise_and.Scalar bitwise_and.Scalar_Tensor bitwise_and.Tensor bitwise_not.default
bitwise_or.Scalar bitwise_or.Scalar_Tensor bitwise_or.Tensor bitwise_xor.Scalar bitwise_xor.Scalar_Tensor
bitwise_xor.Tensor bmm.default cat.default ceil.default clamp.Tensor clamp.default clip.Tensor clip.default
clone.default constant_pad_nd.default convolution.default copy.default cos.default cosh.default
cumsum.default diagonal.default div.Scalar div.Scalar_mode div.Tensor div.Tensor_mode dot.default
elu.default embedding.default embedding_bag.default eq.Scalar eq.Tensor erf.default exp.default
expand.default expm1.default flip.default floor.default floor_divide.Scalar floor_divide.default
fmod.Scalar fmod.Tensor full.default gather.default ge.Scalar ge.Tensor gelu.default grid_sampler.default
grid_sampler_2d.default gt.Scalar gt.Tensor hardsigmoid.default hardtanh.default index.Tensor
index_put.default index_select.default isinf.default isnan.default le.Scalar le.Tensor leaky_relu.default
linear.default log.default log10.default log1p.default log2.default logical_and.default
logical_not.default logical_or.default logical_xor.default lt.Scalar lt.Tensor matmul.default
max.default max.dim max_pool1d.default max_pool2d.default max_pool3d.default maximum.default
mean.default mean.dim min.default min.dim minimum.default mm.default mul.Scalar mul.Tensor mv.default
native_batch_norm.default native_dropout.default native_group_norm.default native_layer_norm.default
ne.Scalar ne.Tensor neg.default pad.default permute.default pixel_shuffle.default
pixel_unshuffle.default pow.Scalar pow.Tensor_Scalar pow.Tensor_Tensor prod.default prod.dim_int
reciprocal.default reflection_pad1d.default reflection_pad2d.default reflection_pad3d.default
relu.default remainder.Scalar remainder.Tensor replication_pad1d.default replication_pad2d.default
replication_pad3d.default reshape.default resize_.default roll.default round.default rsqrt.default
scalar_tensor.default scaled_dot_product_attention.default scatter.src scatter.value select.int
sigmoid.default sign.default sin.default sinh.default slice.Tensor softplus.default sort.default
split.Tensor split.sizes split_with_sizes.default sqrt.default squeeze.dim squeeze.dims sub.Scalar
sub.Tensor sum.default sum.dim_IntList sym_numel.default sym_size.int tan.default tanh.default
tile.default topk.default trunc.default unsqueeze.default upsample_bicubic2d.vec upsample_bilinear2d.vec
upsample_linear1d.vec upsample_nearest1d.vec upsample_nearest2d.vec upsample_nearest3d.vec view.default
where.self detach.default empty.memory_format
""".split())
# (aten.nonzero.default also has a converter, through an output allocator: rejected below as
# data-dependent, per this project's rule of no data-dependent shapes in TensorRT engines.)

# torch-tensorrt's own replacement decompositions (TORCH_TRT_DECOMPOSITIONS, _decompositions.py),
# including in-place ops it rewrites to out-of-place ones; kept as they are here and allowed.
TRT_OWN_DECOMPOSED = frozenset("""
rsqrt.default _unsafe_view.default lift_fresh_copy.default alias.default reciprocal.default
empty_permuted.default slice_scatter.default select_scatter.default empty_strided.default silu.default
silu_.default _log_softmax.default instance_norm.default full_like.default view.default
cudnn_grid_sampler.default masked_scatter.default add_.Tensor addmm_.default relu_.default round_.default
scatter_.src scatter_.value
""".split())

# Removed by torch-tensorrt's lowering passes (remove_assert_nodes.py, remove_detach.py) or evaluated
# at conversion time (sym / python scalar ops).
REMOVED_BY_LOWERING = frozenset("""
_assert_scalar.default _assert_tensor_metadata.default detach.default detach_.default
sym_constrain_range_for_size.default _assert_async.msg
""".split())

# Entries of torch-tensorrt 2.13's ``torch_enabled_decompositions`` (_decomposition_groups.py).
TRT_ENABLED_TORCH_DECOMPOSITIONS = tuple("""
_adaptive_avg_pool2d_backward addcdiv addcdiv_ addcmul addcmul_ addr aminmax arange.default arange.start
avg_pool2d_backward binary_cross_entropy binary_cross_entropy_backward binary_cross_entropy_with_logits
celu col2im count_nonzero cudnn_batch_norm cudnn_batch_norm_backward deg2rad detach diag_embed
diagonal_backward elu_backward embedding_dense_backward empty_like _euclidean_dist.default expand_as eye
fill frac _fused_moving_avg_obs_fq_helper gelu_backward glu_backward hardshrink hardshrink_backward
hardsigmoid_backward hardswish hardswish_ hardswish_backward hardtanh hardtanh_ hardtanh_backward
heaviside huber_loss huber_loss_backward im2col index_add index_add_ index_copy index_copy_ index_fill
index_fill_ isneginf isposinf l1_loss leaky_relu_ leaky_relu_backward lerp linspace logaddexp logaddexp2
logit logit_backward log_sigmoid_backward log_sigmoid_forward _log_softmax_backward_data logspace
logsumexp.default masked_fill masked_fill_ max_pool2d_with_indices_backward mish mse_loss
mse_loss_backward mvlgamma nansum nan_to_num narrow native_batch_norm_backward
_native_batch_norm_legit_functional native_dropout_backward native_group_norm_backward
native_layer_norm_backward new_empty new_full new_ones new_zeros nll_loss_backward nll_loss_forward norm
ones ones_like _prelu_kernel_backward _reshape_alias rad2deg renorm renorm_ rot90 rsub select_backward
select_scatter sgn sigmoid_backward silu_backward sinc slice_backward smooth_l1_loss
smooth_l1_loss_backward soft_margin_loss soft_margin_loss_backward _softmax.out _softmax_backward_data
softplus_backward softshrink softshrink_backward special_entr special_log_ndtr special_xlog1py stack std t
tanh_backward threshold threshold_backward trace transpose.int tril.default triu.default unbind unfold
unfold_backward unfold_copy _unsafe_index upsample_nearest2d_backward var var_mean xlogy zero zero_ zeros
zeros_like clamp_min clamp_max linalg_vector_norm repeat
""".split())

# ``torch_disabled_decompositions`` (kept whole because converters exist) and
# ``ATTENTION_DECOMPOSITION_OPS`` (kept for IAttention unless decompose_attention=True).
TRT_DISABLED_DECOMPOSITIONS = frozenset("""
_softmax.default upsample_nearest1d.vec upsample_nearest2d.vec upsample_nearest3d.vec upsample_linear1d.vec
upsample_bilinear2d.vec upsample_trilinear3d.vec upsample_bicubic2d.vec linear.default matmul.default
scaled_dot_product_attention.default _scaled_dot_product_flash_attention.default
_scaled_dot_product_efficient_attention.default _scaled_dot_product_cudnn_attention.default
""".split())

# What ipcv's TensorRT path decomposes itself before handing the program to torch-tensorrt
# (:func:`prepare_for_tensorrt`): ops without a converter that have a plain torch decomposition.
IPCV_TRT_PREP_DECOMPOSITIONS = ("baddbmm.default",)

# Factory ops with static arguments: folded to constants by torch-tensorrt's constant_fold pass.
FACTORY_OPS = frozenset("""
empty.memory_format zeros.default ones.default full.default arange.default arange.start
arange.start_step scalar_tensor.default empty_strided.default
""".split())

DATA_DEPENDENT_OPS = {
    "nonzero.default": "nonzero has a data-dependent output shape",
    "nonzero_numpy.default": "nonzero has a data-dependent output shape",
    "argwhere.default": "argwhere has a data-dependent output shape",
    "masked_select.default": "masked_select has a data-dependent output shape",
    "_local_scalar_dense.default": ".item() reads a tensor value into the graph's control flow / shapes",
    "item.default": ".item() reads a tensor value into the graph's control flow / shapes",
    "unique.default": "unique has a data-dependent output shape",
    "_unique2.default": "unique has a data-dependent output shape",
    "unique_dim.default": "unique has a data-dependent output shape",
    "unique_consecutive.default": "unique_consecutive has a data-dependent output shape",
    "repeat_interleave.Tensor": "repeat_interleave with tensor repeats has a data-dependent output shape",
    "_assert_async.default": "an assertion on tensor data",
}

HIGHER_ORDER_UNSUPPORTED = {
    "cond": "torch.cond has no TensorRT converter (use torch.where on both branches)",
    "while_loop": "torch.while_loop has no TensorRT converter",
    "map_impl": "torch.map has no TensorRT converter",
    "scan": "torch.scan has no TensorRT converter",
}

REDUCING_SCATTERS = {
    "scatter.reduce": "scatter with reduce=",
    "scatter.value_reduce": "scatter with reduce=",
    "scatter_add.default": "scatter_add",
    "scatter_reduce.two": "scatter_reduce",
    "index_reduce.default": "index_reduce",
    "_index_put_impl_.default": "index_put with accumulate",
}


def _op_name(target) -> str:
    """``aten.add.Tensor`` -> ``add.Tensor``; other callables -> their qualified name."""
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        name = f"{target._opname}.{target._overloadname}"
        return name if ns == "aten" else f"{ns}.{name}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    mod = getattr(target, "__module__", None) or ""
    return f"{mod}.{getattr(target, '__name__', str(target))}".lstrip(".")


def _resolve(name: str) -> List[Any]:
    """``"add.Tensor"`` -> [aten.add.Tensor]; ``"norm"`` (a packet) -> all its overloads."""
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return []
    if overload:
        op = getattr(packet, overload, None)
        return [op] if op is not None else []
    return [getattr(packet, o) for o in packet.overloads()]


def trt_decomposition_table() -> Dict[Any, Any]:
    """The decomposition table torch-tensorrt 2.13 applies (``get_decompositions()`` with default
    settings), minus its own replacement decompositions (their ops are allowed as they are), plus
    the ops ipcv's TensorRT path decomposes itself (:data:`IPCV_TRT_PREP_DECOMPOSITIONS`)."""
    from torch._decomp import get_decompositions
    from torch._export.utils import _collect_all_valid_cia_ops_for_aten_namespace, _get_decomp_for_cia

    enabled = [op for n in TRT_ENABLED_TORCH_DECOMPOSITIONS for op in _resolve(n)]
    table: Dict[Any, Any] = dict(get_decompositions(enabled))
    for op in _collect_all_valid_cia_ops_for_aten_namespace():
        if _op_name(op) not in TRT_DISABLED_DECOMPOSITIONS:
            table[op] = _get_decomp_for_cia(op)
    table.update(get_decompositions([op for n in IPCV_TRT_PREP_DECOMPOSITIONS for op in _resolve(n)]))
    for op in list(table):
        n = _op_name(op)
        if n in TRT_OWN_DECOMPOSED or n in TRT_DISABLED_DECOMPOSITIONS:
            del table[op]
    return table


def prepare_for_tensorrt(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """Decompose the ops ipcv handles before torch-tensorrt (``baddbmm`` -> ``bmm`` + ``add``): the
    program given to ``torch_tensorrt.dynamo.compile`` then has only ops it converts."""
    from torch._decomp import get_decompositions

    ops = [op for n in IPCV_TRT_PREP_DECOMPOSITIONS for op in _resolve(n)]
    present = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    if not present.intersection(ops):
        return ep
    return ep.run_decompositions(get_decompositions(ops))


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
    info = n.meta.get("ipcv") or {}
    if "block" in info:
        return info["block"]
    stack = n.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        parts = str(path).split(".")
        for i, p in enumerate(parts[:-1]):
            if p in ("blocks", "layer", "layers") and parts[i + 1].isdigit():
                return int(parts[i + 1])
    return None


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


def _dim_size(n: fx.Node, src, dim) -> Any:
    v = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    d = dim % max(v.dim(), 1)
    return v.shape[d]


def _check_graph(gm: fx.GraphModule, report: TensorRTReport, max_k: int) -> None:
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        name = _op_name(t)
        blk = _block_of(n)

        def problem(reason, op=name):
            report.problems.append(Finding(n.name, op, reason, blk))

        # data-dependent values / shapes
        if isinstance(t, torch._ops.HigherOrderOperator):
            report.ops[name] += 1
            why = HIGHER_ORDER_UNSUPPORTED.get(t.name(), f"higher-order op {t.name()} has no TensorRT converter")
            problem(why, op=f"torch.{t.name()}" if t.name() in ("cond", "while_loop") else name)
            continue
        if name in DATA_DEPENDENT_OPS:
            report.ops[name] += 1
            problem(DATA_DEPENDENT_OPS[name] + " (TensorRT needs static shapes; no data-dependent output shapes)",
                    op=f"aten.{name.split('.')[0]}")
            continue
        if _unbacked(n.meta.get("val")) and not any(_unbacked(a.meta.get("val")) for a in n.all_input_nodes):
            # reported where the data-dependent size first appears, not at every later use
            problem("output shape depends on tensor data (unbacked symbol in meta['val'])")
        if t in (operator.getitem,):
            report.ops["getitem"] += 1
            continue
        if not isinstance(t, torch._ops.OpOverload):
            # python-level sym ops (operator.mul on SymInts, sym_size, ...) are evaluated at conversion
            mod = getattr(t, "__module__", "") or ""
            if mod in ("_operator", "operator", "math") or name.startswith("torch.sym_") or mod.startswith("torch.fx.experimental"):
                report.ops[name] += 1
                continue
            report.ops[name] += 1
            problem("not an ATen op: export the module first (tensorrt_check(module, example_inputs=...))")
            continue

        report.ops[name] += 1
        # op-specific limits
        if name == "topk.default":
            k = _static_int(_arg(n, 1, "k"))
            report.topk.append((n.name, k if k is not None else _arg(n, 1, "k")))
            if k is None:
                problem("k is not a static int (TensorRT TopK needs a constant k; build one engine per token "
                        "count: export with static shapes)", op="aten.topk")
            elif k > max_k:
                problem(f"k={k} exceeds TensorRT's TopK limit of {max_k} (fewer tokens per segment, or split "
                        "the selection)", op="aten.topk")
            continue
        if name in ("sort.default", "sort.stable"):
            size = _dim_size(n, n.args[0], _arg(n, 1, "dim", -1))
            s = _static_int(size)
            if s is None:
                problem("sort over a dimension that is not static", op="aten.sort")
            elif s > max_k:
                problem(f"sort over {s} elements exceeds TensorRT's TopK limit of {max_k}", op="aten.sort")
            continue
        if name in REDUCING_SCATTERS:
            problem(f"{REDUCING_SCATTERS[name]}: TensorRT scatter layers have no reduction", op=f"aten.{name.split('.')[0]}")
            continue
        if name == "index_put.default" and bool(_arg(n, 3, "accumulate", False)):
            problem("index_put with accumulate=True: TensorRT ScatterND has no reduction", op="aten.index_put")
            continue
        if name in ("index.Tensor", "index_put.default"):
            idx = _arg(n, 1, "indices") or []
            if any(isinstance(i, fx.Node) and isinstance(i.meta.get("val"), torch.Tensor)
                   and i.meta["val"].dtype == torch.bool for i in idx):
                problem("boolean-mask indexing (data-dependent shape; uses nonzero)", op=f"aten.{name.split('.')[0]}")
                continue
        if name == "scaled_dot_product_attention.default":
            mask = _arg(n, 3, "attn_mask")
            if isinstance(mask, fx.Node):
                report.warnings.append(Finding(
                    n.name, name, "attention with a mask: IAttentionLayer in torch-tensorrt >= 2.13 (older "
                    "releases decompose it, decompose_attention=True)", blk))
        if name in CONVERTER_OPS:
            continue
        if name in TRT_OWN_DECOMPOSED or name in REMOVED_BY_LOWERING:
            report.handled_by_lowering[name] += 1
            continue
        if name in FACTORY_OPS or (not any(isinstance(a, fx.Node) for a in n.all_input_nodes) and name.split(".")[0]
                                   in ("empty", "zeros", "ones", "full", "arange", "eye", "linspace")):
            report.handled_by_lowering[name] += 1
            continue
        base, _, ovl = name.partition(".")
        if base.endswith("_") and f"{base[:-1]}.{ovl}" in (CONVERTER_OPS | TRT_OWN_DECOMPOSED | _decomposed_names()):
            report.handled_by_lowering[name + " (functionalized)"] += 1  # run_decompositions functionalizes
            continue
        if base == "to":  # torch.export's run_decompositions turns aten.to.* into _to_copy (converter)
            report.handled_by_lowering[name + " (-> _to_copy)"] += 1
            continue
        if name in _decomposed_names():
            report.handled_by_lowering[name + " (decomposed)"] += 1  # a graph checked before decomposition
            continue
        problem("no torch-tensorrt converter (torch-tensorrt 2.13 aten_ops_converters.py) and not removed by its "
                "lowering", op=f"aten.{name}")


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


def format_ops(ops: Iterable[str]) -> str:
    return ", ".join(sorted(ops))
