"""What torch-tensorrt 2.13.0 converts, lowers or decomposes: the data behind :mod:`ipcv_compile.tensorrt_check`.

Op names are ``str(OpOverload)`` without the ``aten.`` prefix (``"add.Tensor"``; :func:`_op_name`
makes one from a node target, :func:`_resolve` turns one back into OpOverloads).  These tables are a
snapshot: :func:`compare_with_installed` diffs :data:`CONVERTER_OPS` against the converter registry of
an installed torch-tensorrt.

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
  ``_assert_tensor_metadata`` erased), ``remove_detach.py``, ``constant_folding.py``;
* ``py/torch_tensorrt/dynamo/conversion/_ConverterRegistry.py`` (``DYNAMO_CONVERTERS``, the
  ``ConverterRegistry`` that :func:`compare_with_installed` reads through ``unique_targets()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, FrozenSet, Iterable, List

import torch

from ..backends.common import BackendUnavailable

__all__ = [
    "TRT_TOPK_MAX_K",
    "CONVERTER_OPS",
    "TRT_OWN_DECOMPOSED",
    "REMOVED_BY_LOWERING",
    "TRT_ENABLED_TORCH_DECOMPOSITIONS",
    "TRT_DISABLED_DECOMPOSITIONS",
    "IPCV_TRT_PREP_DECOMPOSITIONS",
    "FACTORY_OPS",
    "DATA_DEPENDENT_OPS",
    "HIGHER_ORDER_UNSUPPORTED",
    "REDUCING_SCATTERS",
    "ConverterDiff",
    "TorchTensorRTUnavailable",
    "compare_with_installed",
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
# (and ipcv's own ops, ``torch.ops.ipcv.*``: lowered with ``ipcv_compile.ops.decompositions()``.)

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


# ---------------------------------------------------------------------------------------------
class TorchTensorRTUnavailable(BackendUnavailable, ImportError):
    """torch-tensorrt is not installed (or does not import).  Both a :class:`BackendUnavailable`
    (what the ``tensorrt`` backend raises, exit code 3 in the CLI) and an ``ImportError``."""


@dataclass(frozen=True)
class ConverterDiff:
    """:data:`CONVERTER_OPS` against an installed torch-tensorrt's converter registry (ATen ops only).

    ``only_installed``: ops the installed release converts that the snapshot lacks (for 2.13.0 this
    includes ``nonzero.default``, left out on purpose: its converter needs an output allocator).
    ``only_snapshot``: snapshot entries the installed release has no converter for.
    """

    version: str
    only_installed: FrozenSet[str]
    only_snapshot: FrozenSet[str]

    @property
    def same(self) -> bool:
        return not (self.only_installed or self.only_snapshot)


def _aten_names(targets: Iterable[Any]) -> FrozenSet[str]:
    """Registry keys -> op names as in :data:`CONVERTER_OPS`.  An ``OpOverloadPacket`` key (allowed
    by the registry when the op has one overload besides ``out``) stands for its non-``out``
    overloads; non-ATen keys (``operator.*``, ``torch.sym_*``, ``prims``, ``tensorrt`` ops) are left
    out, as the snapshot holds ATen ops only."""
    names = set()
    for t in targets:
        if isinstance(t, torch._ops.OpOverloadPacket):
            ops = [getattr(t, o) for o in t.overloads() if o != "out"]
        else:
            ops = [t]
        names.update(_op_name(op) for op in ops
                     if isinstance(op, torch._ops.OpOverload) and op.namespace == "aten")
    return frozenset(names)


def compare_with_installed() -> ConverterDiff:
    """Diff the snapshot :data:`CONVERTER_OPS` with the installed torch-tensorrt's live registry
    (``torch_tensorrt.dynamo.conversion.DYNAMO_CONVERTERS.unique_targets()``; releases without
    that object: ``DYNAMO_ATEN_CONVERTERS``, the dict it wraps).

    Raises :class:`TorchTensorRTUnavailable` (an ``ImportError``) when torch-tensorrt is not
    installed or fails to import — an error rather than ``None``, so that a caller cannot mistake
    "nothing to compare with" for "no differences".
    """
    try:
        import torch_tensorrt
        from torch_tensorrt.dynamo import conversion
    except (ImportError, OSError) as e:
        raise TorchTensorRTUnavailable(
            f"compare_with_installed needs torch-tensorrt, which does not import here ({type(e).__name__}: {e}); "
            "the converter snapshot CONVERTER_OPS is for torch-tensorrt 2.13.0") from e
    registry = getattr(conversion, "DYNAMO_CONVERTERS", None)
    targets = registry.unique_targets() if registry is not None else conversion.DYNAMO_ATEN_CONVERTERS.keys()
    installed = _aten_names(targets)
    return ConverterDiff(str(getattr(torch_tensorrt, "__version__", "unknown")),
                         installed - CONVERTER_OPS, CONVERTER_OPS - installed)
