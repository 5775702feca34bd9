"""Will torch-tensorrt convert this graph?  A static check that runs without a GPU or torch-tensorrt.

``tensorrt_check(program)`` takes an ``ExportedProgram`` (or an ATen-level GraphModule, or any module
plus example inputs, which is exported with **static** shapes — TensorRT engines are built per static
shape here) and reports every node that would not become part of a TensorRT engine:

* the op has no torch-tensorrt converter and is not removed / decomposed by torch-tensorrt's lowering
  (the allowlist in :mod:`.converters`, taken from the torch-tensorrt 2.13.0 sources listed there);
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

The package: :mod:`.converters` (the torch-tensorrt 2.13.0 tables and their sources;
``compare_with_installed()`` diffs them with an installed torch-tensorrt), :mod:`.rules` (the rule
chain, one function per rule), :mod:`.check` (``tensorrt_check``, the report, the decomposition
table).  Per-node capability validators that depend on dtypes or settings are not all reproduced;
the important ones for IPCV graphs (TopK/sort limits, scatter reductions, boolean indices) are.
A graph that passes should convert fully; building the engine on a GPU is the final proof
(``ipcv_compile.lower(..., "tensorrt")``).
"""

from .check import (Finding, TensorRTCheckError, TensorRTReport, prepare_for_tensorrt, tensorrt_check,
                    trt_decomposition_table)
from .converters import CONVERTER_OPS, TRT_TOPK_MAX_K, TorchTensorRTUnavailable, _resolve, compare_with_installed

__all__ = [
    "tensorrt_check",
    "TensorRTReport",
    "Finding",
    "TensorRTCheckError",
    "TRT_TOPK_MAX_K",
    "CONVERTER_OPS",
    "trt_decomposition_table",
    "prepare_for_tensorrt",
    "compare_with_installed",
    "TorchTensorRTUnavailable",
]
