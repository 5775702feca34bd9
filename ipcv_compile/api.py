"""User-facing API: ``capture``, ``rewrite``, and the module it returns."""

from __future__ import annotations

import copy
import time
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import fx, nn

from ipcv_core.config import IPCVConfig
from ipcv_core.schedule import Schedule
from ipcv_core.segments import SegmentLayout

from .extension import rewrite_module
from .graph_utils import quiet_torch_deprecations
from .locate import GraphMap, locate
from .passes.ipcv_rewrite import IPCVRewritePass, RewriteReport, query_rows
from .spec import LocateSpec

__all__ = ["capture", "rewrite", "IPCVModule", "default_dynamic_shapes", "CaptureError"]


def default_dynamic_shapes(args: Sequence[Any], kwargs: Dict[str, Any], hidden_index: int, token_dim: int):
    """Token dimension dynamic in the hidden input and in every other tensor input's dims of the
    same size (rotary tables, masks); batch dim dynamic too when the example batch is >= 2."""
    from torch.export import Dim

    hidden = args[hidden_index]
    n = hidden.shape[token_dim]

    def spec_for(t, is_hidden):
        if not isinstance(t, torch.Tensor):
            return None
        d = {}
        for i, s in enumerate(t.shape):
            if s == n and (not is_hidden or i == token_dim):
                d[i] = Dim.DYNAMIC
        if is_hidden and token_dim == 1 and t.shape[0] >= 2:
            d[0] = Dim.DYNAMIC
        return d or None

    a = tuple(spec_for(t, i == hidden_index) for i, t in enumerate(args))
    k = {name: spec_for(t, False) for name, t in kwargs.items()}
    return a, k


def capture(
    module: nn.Module,
    args: Tuple[Any, ...],
    kwargs: Optional[Dict[str, Any]] = None,
    dynamic_shapes=None,
    hidden_index: int = 0,
    token_dim: int = 1,
) -> fx.GraphModule:
    """``torch.export`` (non-strict) with a dynamic token dimension, as an unlifted GraphModule
    (parameters as attributes; same call signature and output structure as ``module``)."""
    kwargs = dict(kwargs or {})
    if dynamic_shapes is None:
        a, k = default_dynamic_shapes(args, kwargs, hidden_index, token_dim)
        dynamic_shapes = (*a, *k.values()) if not kwargs else {**_arg_names(module, a), **k}
    with torch.no_grad(), quiet_torch_deprecations():
        try:
            ep = torch.export.export(module, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:
            hint = _dynamic_shapes_hint(e, args, hidden_index, token_dim)
            if hint is None:
                raise
            raise CaptureError(hint) from e
        gm = ep.module()
    gm.meta["ipcv_range_constraints"] = {str(k): str(v) for k, v in ep.range_constraints.items()}
    _returned_values_not_casts(gm)
    return gm


class CaptureError(RuntimeError):
    """``torch.export`` could not keep a dimension dynamic; the message says what to pass."""


def _dynamic_shapes_hint(err: Exception, args: Sequence[Any], hidden_index: int, token_dim: int) -> Optional[str]:
    """torch.export's "Constraints violated ... specialized it to be a constant" as an error naming
    the cause and the ``dynamic_shapes`` to pass (``None`` for any other error)."""
    text = str(err)
    if "Constraints violated" not in text and "specialized it to be a constant" not in text:
        return None
    first = next((ln.strip() for ln in text.splitlines() if "specialized" in ln), text.splitlines()[0])
    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
    hidden = args[hidden_index] if hidden_index < len(args) else None
    batch = token_dim == 1 and isinstance(hidden, torch.Tensor) and hidden.dim() >= 2
    per_input = ", ".join(
        ("{0: batch, 1: tokens}" if batch and isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[0] == hidden.shape[0]
         and a.shape[1] == hidden.shape[1] else
         "{%d: tokens}" % token_dim if isinstance(a, torch.Tensor) and a.dim() > token_dim
         and a.shape[token_dim] == hidden.shape[token_dim] else "None")
        for a in args) if isinstance(hidden, torch.Tensor) else "..."
    return (
        f"capture: torch.export could not keep a dimension of the example inputs dynamic ({first}). The "
        f"default marks the token dimension ({token_dim}) of every input of the hidden states' token count "
        f"dynamic, and the batch dimension of the hidden states only: an input that carries the batch too "
        f"(per-token side inputs of shape (B, N, ...): rotary tables, masks) ties the batch to the example. "
        f"Pass dynamic_shapes with one Dim per dimension shared by every input that has it, e.g.\n"
        f"    from torch.export import Dim\n    batch, tokens = Dim('batch'), Dim('tokens')\n"
        f"    rewrite(..., dynamic_shapes=({per_input}))   # example input shapes {shapes}\n"
        f"with an example batch >= 2 (torch.export specialises a size of 1), or make those inputs batch-free "
        f"((N, ...), broadcast inside the blocks).")


_NO_OP_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.alias.default)


def _returned_values_not_casts(gm: fx.GraphModule) -> None:
    """A module returning an intermediate value (a tap: ``(out, block_3_output)``) whose next
    consumer starts with a no-op cast (``x.to(float32)`` of a float32 ``x`` returns ``x`` itself, so
    export records the *cast* as the returned value): return the value, not the cast, so that the
    returned tensor belongs to the block that computed it."""
    out = next(n for n in gm.graph.nodes if n.op == "output")

    def plain(a):
        while isinstance(a, fx.Node) and a.target in _NO_OP_CASTS and isinstance(a.args[0], fx.Node):
            src, val = a.args[0].meta.get("val"), a.meta.get("val")
            if not (isinstance(src, torch.Tensor) and isinstance(val, torch.Tensor) and src.dtype == val.dtype
                    and src.device == val.device):
                break
            a = a.args[0]
        return a

    new = fx.node.map_arg(out.args, plain)
    if new != out.args:
        out.args = new
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _arg_names(module: nn.Module, arg_specs):
    import inspect

    names = [p for p in inspect.signature(module.forward).parameters]
    return {names[i]: s for i, s in enumerate(arg_specs)}


class IPCVModule(nn.Module):
    """A rewritten block stack: same call signature and output structure as the original module.

    No per-call state is stored on the module (keep sets etc. live only inside a call), so one
    instance may be called from several threads.
    """

    def __init__(self, gm: fx.GraphModule, config: IPCVConfig, layout: SegmentLayout, gmap: GraphMap,
                 report: RewriteReport, nodes_before: int, rewrite_seconds: float):
        super().__init__()
        self.graph_module = gm
        self.config = config
        self.layout = layout
        self.report = report
        self.nodes_before = nodes_before
        self.rewrite_seconds = rewrite_seconds
        self._depth = gmap.depth
        self._token_symbol = gmap.token_symbol

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    def refresh_meta(self) -> "IPCVModule":
        """Bring every node's ``meta["val"]`` up to date with the rewritten shapes (fake-tensor
        propagation; deferred at rewrite time because it takes seconds on deep towers)."""
        stale = self.graph_module.meta.get("ipcv_meta_stale")
        if stale is not None:
            from .graph_utils import refresh_meta

            refresh_meta(self.graph_module, stale or None)
            self.graph_module.meta.pop("ipcv_meta_stale", None)
        return self

    @property
    def nodes_after(self) -> int:
        return len(self.graph_module.graph.nodes)

    def print_readable(self, print_output: bool = True) -> str:
        return self.graph_module.print_readable(print_output=print_output)

    def rows_per_block(self) -> Dict[int, Dict[str, str]]:
        """For each block, the (symbolic) row counts seen by the FFN and by the attention queries /
        keys, read from the rewritten graph's ``meta["val"]``."""
        self.refresh_meta()
        out: Dict[int, Dict[str, str]] = {}
        for n in self.graph_module.graph.nodes:
            info = n.meta.get("ipcv") or {}
            if "block" not in info:
                continue
            b = info["block"]
            v = n.meta.get("val")
            if info.get("role") == "attention_core" and isinstance(v, torch.Tensor):
                q, k = n.args[0].meta["val"], n.args[1].meta["val"]
                out.setdefault(b, {})["queries"] = str(query_rows(n, q))
                out[b]["keys"] = str(k.shape[-2])
            if info.get("role") == "ffn" and isinstance(v, torch.Tensor) and "ffn" not in out.get(b, {}):
                out.setdefault(b, {})["ffn"] = str(v.shape[-2] if v.dim() >= 2 else v.shape[0])
        return out

    def summary(self) -> str:
        cfg = self.config
        lines = [
            f"IPCV rewrite: retain={cfg.retain} l_p={cfg.prune_layer} Δ={cfg.as_depth} k={cfg.k} "
            f"weighting={cfg.weighting} reintegrate={cfg.reintegrate}",
            f"segments: {'one per batch row' if self.layout.lengths is None else self.layout.lengths}, "
            f"protected per segment: {self.layout.protected}; token count symbol N = {self._token_symbol}",
            f"nodes: {self.nodes_before} before, {self.nodes_after} after; rewrite took {self.rewrite_seconds * 1e3:.0f} ms",
            "inserted: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.report.inserted.items())),
            f"reshapes re-pointed to the kept count: {len(self.report.sizes_repointed)}; "
            f"pre-attention nodes copied for AS: {self.report.pre_attention_copies}; "
            f"side inputs gathered: {self.report.side_inputs or 'none'}",
        ]
        rows = self.rows_per_block()
        lines += Schedule.build(cfg, self._depth).table([rows.get(b, {}) for b in range(self._depth)])
        if cfg.reintegrate:
            lines.append("after last block: reintegration (NGR + restore to N rows, original order)")
        return "\n".join(lines)


def rewrite(
    module: nn.Module,
    config: Union[IPCVConfig, float, None] = None,
    *,
    example_inputs: Optional[Tuple[Any, ...]] = None,
    example_kwargs: Optional[Dict[str, Any]] = None,
    spec: Optional[LocateSpec] = None,
    layout: Optional[SegmentLayout] = None,
    dynamic_shapes=None,
    hidden_index: int = 0,
    **overrides: Any,
) -> nn.Module:
    """Capture ``module`` and rewrite it with IPCV.

    Either give ``spec`` + ``example_inputs`` (+ ``layout``), or give neither and let a registered
    rewriter (:mod:`ipcv_compile.extension`; ``ipcv_adapters`` registers the HF towers) recognise
    the module: ``rewrite(model.visual, retain=0.35)``.  ``config``: an :class:`IPCVConfig`, or a
    number taken as ``retain``; ``overrides`` that name :class:`IPCVConfig` fields (``retain=0.35``,
    ``k=8``) replace those fields, the others are options of the module's rewriter (e.g. the towers'
    ``cache_size`` and ``feature_layers``).
    """
    fields = IPCVConfig.field_names()
    changes = {k: v for k, v in overrides.items() if k in fields}
    options = {k: v for k, v in overrides.items() if k not in fields}
    if isinstance(config, (int, float)) and not isinstance(config, bool):
        if "retain" in changes:
            raise TypeError("rewrite: retain given twice (as config and as retain=)")
        changes["retain"] = config
        config = None
    if config is not None and not isinstance(config, IPCVConfig):
        raise TypeError(f"rewrite: config must be an IPCVConfig or a retain ratio in (0, 1], got {type(config).__name__}")
    config = (config or IPCVConfig()).replace(**changes)
    if spec is None:
        if example_inputs is not None or layout is not None:
            raise ValueError("rewrite: example_inputs / layout are given but no spec (LocateSpec); give all three, "
                             "or none to let a registered rewriter handle the module")
        return rewrite_module(module, config, **options)
    if options:
        raise TypeError(f"rewrite: unknown option(s) {sorted(options)} (IPCVConfig fields: {sorted(fields)})")
    if example_inputs is None:
        raise ValueError("rewrite: example_inputs are required when a spec is given")
    layout = layout or SegmentLayout()
    t0 = time.perf_counter()
    gm = capture(module, example_inputs, example_kwargs, dynamic_shapes, hidden_index, spec.token_dim)
    return rewrite_graph(gm, config, spec, layout, t0=t0)


def rewrite_graph(gm: fx.GraphModule, config: Union[IPCVConfig, Schedule], spec: LocateSpec, layout: SegmentLayout,
                  t0: Optional[float] = None, refresh_meta: bool = False, check_rows: bool = True) -> IPCVModule:
    """Rewrite an already captured GraphModule (from :func:`capture`); ``gm`` is not modified.
    ``refresh_meta=True`` updates every node's ``meta["val"]`` right away (else on demand);
    ``check_rows`` verifies the rows every block sees after the rewrite (the pass's ``ensures``)."""
    t0 = time.perf_counter() if t0 is None else t0
    gm = _fresh(gm)
    nodes_before = len(gm.graph.nodes)
    gmap = locate(gm, spec)
    rw = IPCVRewritePass(gmap, config, layout, refresh=refresh_meta, check_rows=check_rows)
    result = rw(gm)
    return IPCVModule(result.graph_module, rw.config, layout, gmap, result.graph_module.meta["ipcv_report"], nodes_before,
                      time.perf_counter() - t0)


def _fresh(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (graph, attributes, hooks) that shares its parameters and buffers, so the
    rewrite can mutate the graph without touching the captured one or duplicating weights."""
    memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
    with quiet_torch_deprecations():
        return copy.deepcopy(gm, memo)
