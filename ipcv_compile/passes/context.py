"""What the passes of the IPCV rewrite share: one frozen :class:`RewriteContext` per rewrite (the
graph map, the :class:`~ipcv_core.schedule.Schedule`, the layout, the report), and the
:class:`Rewritten` record — what earlier passes inserted, read back from ``node.meta["ipcv"]``.

Tags the passes put in ``node.meta["ipcv"]`` (besides locate's ``block`` / ``role``):

=======================  ====================================================================
``role="prune"``         an ``ipcv.prune`` node; ``stage``: its index in ``Schedule.stages``
``role="stage_output"``  a field of a stage's :class:`~ipcv_core.prune.PruneOutputs`
                         (``stage``, ``field``)
``role="side_input"``    a side input (``args[0]``) gathered to a stage's rows: ``stage`` and
                         ``rows`` — ``"kept"`` (the kept rows), ``"as"`` (an AS block's rows
                         ``[kept_i; removed_i]``), ``"pre"`` (the rows entering the stage)
``role="as_positions"``  the original positions of an AS block's rows (``stage``)
``copy``                 a node the rewrite copied into block ``block``: ``"key"`` (the key path
                         on the rows entering a stage) or ``"attention_input"`` (AS: the path to
                         the attention input on all rows)
=======================  ====================================================================
"""

from __future__ import annotations

import abc
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ipcv_core.prune import kept_lengths
from ipcv_core.schedule import BlockPlan, Schedule
from ipcv_core.segments import SegmentLayout

from .. import ops as ipcv_ops
from ..locate import BlockInfo, GraphMap
from .nodes import Rewritten

__all__ = ["RewriteError", "RewriteReport", "RewriteContext", "RewriteStep"]

_CONTEXT_KEY = "ipcv_rewrite_context"


class RewriteError(RuntimeError):
    pass


@dataclass
class RewriteReport:
    inserted: Counter = field(default_factory=Counter)  # kind of inserted node -> count
    sizes_repointed: List[str] = field(default_factory=list)
    side_inputs: Dict[str, tuple] = field(default_factory=dict)
    query_gathers: int = 0
    pre_attention_copies: int = 0
    key_copies: int = 0  # nodes copied to compute the key metric (keys before a stage)
    unsplit_projections: Dict[str, str] = field(default_factory=dict)  # fused projection -> why it stays whole


# --------------------------------------------------------------------------------------------- the context
@dataclass(frozen=True)
class RewriteContext:
    """One rewrite: the GraphModule, its :class:`GraphMap`, the :class:`Schedule`, the layout (the
    patch grid dropped unless a variant needs it), the report, and the token count of a batch row
    (an int for static layouts, the token symbol's size else).  Created once by
    :class:`~ipcv_compile.passes.ipcv_rewrite.IPCVRewritePass` and kept in ``gm.meta`` while its
    passes run (:meth:`of`); it holds no rewrite state."""

    gm: fx.GraphModule
    gmap: GraphMap
    schedule: Schedule
    layout: SegmentLayout
    report: RewriteReport
    n_tokens: object
    keeps_all: bool

    @classmethod
    def of(cls, gm: fx.GraphModule) -> "RewriteContext":
        ctx = gm.meta.get(_CONTEXT_KEY)
        if not isinstance(ctx, cls) or ctx.gm is not gm:
            raise RewriteError("the IPCV rewrite passes run inside IPCVRewritePass (no rewrite context on this "
                               "GraphModule)")
        return ctx

    def attach(self) -> None:
        self.gm.meta[_CONTEXT_KEY] = self

    def detach(self) -> None:
        self.gm.meta.pop(_CONTEXT_KEY, None)

    @property
    def g(self) -> fx.Graph:
        return self.gm.graph

    @property
    def config(self):
        return self.schedule.config

    def block(self, plan: BlockPlan) -> BlockInfo:
        return self.gmap.blocks[plan.index]

    def pruned(self):
        """The plans of the blocks the rewrite changes beyond per-segment attention."""
        return [] if self.keeps_all else [p for p in self.schedule if p.pruned]

    # ------------------------------------------------------------------ which stage's rows
    def attention_stage(self, plan: BlockPlan) -> Optional[int]:
        """The last stage whose kept rows the block's attention reads (None: every row)."""
        return self._stage_before(plan.index, plan.stage if plan.stage_at_input else None)

    def ffn_stage(self, plan: BlockPlan) -> Optional[int]:
        """The last stage whose kept rows the block's FFN (and output) reads."""
        return self._stage_before(plan.index, plan.stage)

    def _stage_before(self, b: int, own: Optional[int]) -> Optional[int]:
        if own is not None:
            return own
        earlier = [p.stage for p in self.schedule.blocks[:b] if p.stage is not None]
        return earlier[-1] if earlier else None

    def lengths(self, stage: Optional[int]) -> Optional[tuple]:
        """Per-segment rows after ``stage`` (None: the layout's; None for one segment per row)."""
        if stage is None:
            return self.layout.lengths
        return kept_lengths(self.layout, self.config, stage, self.n_tokens)

    def rows_in(self, done: Rewritten, plan: BlockPlan) -> fx.Node:
        """The residual stream entering the block, as rewritten."""
        if plan.stage_at_input:
            return done.stages[plan.stage]["x_keep"]
        return self.block(plan).input

    # ------------------------------------------------------------------ inserting
    def insert(self, op, args, kwargs=None, name: Optional[str] = None, kind: Optional[str] = None) -> fx.Node:
        """Insert ``op(*args, **kwargs)`` at the graph's insertion point (named ``name``, made unique
        by fx), counted in the report (``kind``: the report's name for it, default ``ipcv_<op>``)."""
        n = self.g.create_node("call_function", op, tuple(args), kwargs or {}, name=name)
        self.report.inserted[kind or "ipcv_" + op.name().split("::")[-1]] += 1
        return n

    def getitem(self, n: fx.Node, i: int) -> fx.Node:
        self.report.inserted["getitem"] += 1
        return self.g.call_function(operator.getitem, (n, i))

    def prune_kwargs(self, stage: int) -> dict:
        return dict(stage=stage, **ipcv_ops.layout_args(self.layout, self.gmap.token_dim),
                    **ipcv_ops.config_args(self.config))

    def reconstruct(self, rows: fx.Node, stages, where, name: str) -> fx.Node:
        """``ipcv.reconstruct`` of ``rows`` (the last of ``stages``' kept rows at some layer)."""
        flat = [st[f] for st in stages for f in ipcv_ops.RECONSTRUCT_FIELDS]
        with where:
            return self.insert(ipcv_ops.reconstruct, (rows, flat), dict(token_dim=self.gmap.token_dim), name)

    def concat_rows(self, kept: fx.Node, removed: fx.Node, dim: int, stage: int, name: str) -> fx.Node:
        """The kept and the removed rows of ``stage``, per segment ``[kept_i; removed_i]``."""
        full = self.layout.lengths
        if full is None:
            return self.g.create_node("call_function", torch.ops.aten.cat.default, ([kept, removed], dim), name=name)
        kept_l = self.lengths(stage)
        return self.insert(ipcv_ops.segment_concat, (kept, removed),
                           dict(a_lengths=list(kept_l), b_lengths=[n - k for n, k in zip(full, kept_l)], dim=dim), name)

    # ------------------------------------------------------------------ attention windows
    def windowed(self, blk: BlockInfo) -> bool:
        spec = self.gmap.spec
        return self.layout.windows is not None and spec is not None and blk.index in spec.windowed_blocks

    def window_groups(self, rows: Optional[fx.Node]) -> fx.Node:
        """The attention window of each row (``rows``: the rows' original positions; None = all rows
        in order): a constant of the layout (one buffer per graph), gathered to the rows."""
        g = self.g
        wid = next((n for n in g.nodes if n.op == "get_attr" and n.target == "ipcv_window_ids"), None)
        if wid is None:
            self.gm.register_buffer("ipcv_window_ids", self.layout.window_ids(self.gmap.hidden.meta["val"].device),
                                    persistent=False)
            with g.inserting_before(next(n for n in g.nodes if n.op != "placeholder")):
                wid = g.get_attr("ipcv_window_ids")
        if rows is None:
            return wid
        with g.inserting_before(rows.next):
            return self.insert(ipcv_ops.gather_tokens, (wid, rows), dict(dims=[0], batch="none"))

    def block_nodes(self, done: Rewritten, blk: BlockInfo) -> List[fx.Node]:
        """The block's own nodes (erased ones have no inputs left) and the ones the rewrite copied
        into it."""
        return list(blk.nodes) + done.copies_of(blk.index)


class RewriteStep(PassBase):
    """A pass of the IPCV rewrite: :meth:`run` rewrites the GraphModule of a
    :class:`RewriteContext` and says whether it changed it.  ``requires`` checks that the context is
    there (subclasses add their own preconditions; ``ensures`` their postconditions).  No state:
    one instance serves every rewrite."""

    def requires(self, gm: fx.GraphModule) -> None:
        RewriteContext.of(gm)

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(gm, bool(self.run(RewriteContext.of(gm))))

    @abc.abstractmethod
    def run(self, ctx: RewriteContext) -> bool:
        """Rewrite ``ctx.gm``; True when it changed."""
