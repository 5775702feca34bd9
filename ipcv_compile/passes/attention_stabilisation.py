"""Attention stabilisation (AS blocks ``[l_p, l_p + Δ)``): keys / values over all rows (kept +
NGR-reconstructed), queries — and everything after the attention core — for the kept rows only.

One stage (the paper's method): the removed rows' values come from ``ipcv.ngr`` alone and join the
kept rows per segment as ``[kept_i; removed_i]`` (``ipcv.segment_concat``; no scatter into the
original order: attention does not depend on the order of its keys); that feeds a copy of the path
from the block input to the attention input (``copy="attention_input"``), whose side inputs are the
AS rows' (:mod:`.side_inputs`).  The nodes only the query depends on run on the kept rows
(:func:`narrow_queries`; a fused q/k/v projection is split, :mod:`.fused_projection`), else the
queries are the first ``K_i`` rows of each segment (``q_prefix``; a slice for one segment per row).
Several stages: the full sequence is restored in original order (``ipcv.reconstruct``) and the
queries gathered to the kept rows.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import fx

from ipcv_core.schedule import BlockPlan

from .. import ops as ipcv_ops
from ..locate import BlockInfo, ancestors_within, path_between, token_symbol_dims
from .context import RewriteContext, RewriteStep
from .nodes import Rewritten, batch_mode, mask_of, node_order, set_mask, tag
from .fused_projection import UnsplittableProjection, analyse_fused_projection, split_fused_projection
from .segment_attention import split_attention
from .side_inputs import replace_side_inputs

__all__ = ["AttentionStabilisationPass", "narrow_queries"]


class _Block:
    """One AS block being rewritten: its plan, nodes, stage and the rows entering it."""

    def __init__(self, ctx: RewriteContext, done: Rewritten, plan: BlockPlan):
        self.ctx, self.done, self.plan = ctx, done, plan
        self.blk: BlockInfo = ctx.block(plan)
        self.stage: int = ctx.attention_stage(plan)
        self.st = done.stages[self.stage]
        self.rows: fx.Node = ctx.rows_in(done, plan)
        self.attn_in = self.rows if self.blk.attn_input is self.blk.input else self.blk.attn_input
        self.cores = list(done.cores.get(plan.index, []))
        self.copies: List[fx.Node] = []  # the attention-input path copied onto all rows

    def token_mask_dim(self, core: fx.Node) -> Optional[int]:
        """The query dim of the core's mask, when that is a token dim."""
        m = mask_of(core)
        if not isinstance(m, fx.Node):
            return None
        d = m.meta["val"].dim() - 2
        return d if d in token_symbol_dims(m.meta["val"], self.ctx.gmap.token_symbol) else None

    def prefix_rows(self, a: fx.Node, dim: int, name: str) -> fx.Node:
        """The first ``K_i`` rows of each segment of ``a`` along ``dim`` (a slice for one segment per row)."""
        ctx = self.ctx
        if ctx.layout.lengths is None:
            k_rows = ctx.g.call_function(torch.ops.aten.sym_size.int, (self.rows, ctx.gmap.token_dim))
            return ctx.g.call_function(torch.ops.aten.slice.Tensor, (a, dim, 0, k_rows))
        return ctx.insert(ipcv_ops.segment_prefix, (a,), dict(lengths=list(ctx.layout.lengths),
                                                              take=list(ctx.lengths(self.stage)), dim=dim), name)


def _copy_attention_input(ab: _Block, x_all: fx.Node) -> fx.Node:
    """The path block input -> attention input (e.g. the pre-attention norm) copied onto ``x_all``
    (the copies: ``ab.copies``); every attention node then reads the copy."""
    ctx, blk = ab.ctx, ab.blk
    if ab.attn_in is ab.rows:
        full = x_all
    else:
        env = {ab.rows: x_all}
        with ctx.g.inserting_before(ab.attn_in.next):  # every input of the path is defined by then
            for n in path_between(ab.rows, ab.attn_in, blk.nodes):
                c = ctx.g.node_copy(n, lambda a: env.get(a, a))
                c.meta = dict(n.meta)
                env[n] = tag(c, copy="attention_input")
                ab.copies.append(c)
                ctx.report.pre_attention_copies += 1
        full = env[ab.attn_in]
    for n in blk.attn_nodes:
        n.replace_input_with(ab.attn_in, full)
    return full


def narrow_queries(ab: _Block, core: fx.Node, full_attn_in: fx.Node) -> bool:
    """One stage: the nodes only the query depends on (q projection, its rotary, ...) run on the
    kept rows only.  Where the query path leaves a value shared with keys / values, it takes that
    value's kept rows (the kept attention input itself, or the first ``K_i`` rows of each segment);
    its side inputs become the kept rows' ones; a fused projection is split.  Returns False (and
    changes nothing) when the query shares its whole path with the keys."""
    ctx, blk = ab.ctx, ab.blk
    nodes = set(blk.attn_nodes) | set(ab.copies)
    q, k, v = core.args[:3]
    q_only = ancestors_within(q, nodes) - ancestors_within(k, nodes) - ancestors_within(v, nodes)
    # a multi-output value (unbind, split) is not a row tensor: the query starts at its getitem
    q_only -= {n for n in q_only if any(isinstance(a.meta.get("val"), (tuple, list)) and a not in q_only
                                        for a in n.all_input_nodes)}
    if not q_only:
        return False
    kept_side = ab.done.side(ab.stage)
    side_as = {s_k: s_ for s_, s_k in ab.done.side(ab.stage, "as").items()}
    kept_of: Dict[fx.Node, fx.Node] = {}
    order = node_order(ctx.g)
    for n in sorted(q_only, key=order.get):
        for a in list(n.all_input_nodes):
            if a in q_only:
                continue
            if a in side_as or a is full_attn_in:
                n.replace_input_with(a, kept_side[side_as[a]] if a in side_as else ab.attn_in)
                continue
            if a not in kept_of:
                kr = _kept_rows_of(ab, a)
                if kr is None:
                    continue  # not a row value (weights, sizes)
                kept_of[a] = kr
                _split_projection(ab, a, full_attn_in)
            n.replace_input_with(a, kept_of[a])
    ctx.report.query_gathers += 1
    return True


def _kept_rows_of(ab: _Block, a: fx.Node) -> Optional[fx.Node]:
    """The kept rows of a value computed on the AS rows: the first ``K_i`` rows of each segment
    along its one token dim (None: not a row value)."""
    val = a.meta.get("val")
    dims = token_symbol_dims(val, ab.ctx.gmap.token_symbol) if isinstance(val, torch.Tensor) else ()
    if len(dims) != 1:
        return None
    with ab.ctx.g.inserting_before(a.next):  # (inserting_after would reverse several new nodes)
        return ab.prefix_rows(a, dims[0], f"{a.name}_kept")


def _split_projection(ab: _Block, start: fx.Node, full_attn_in: fx.Node) -> None:
    ctx = ab.ctx
    try:
        proj = analyse_fused_projection(ab.blk.attn_nodes, start, full_attn_in, ctx.gmap.token_symbol,
                                        ctx.gmap.token_dim)
    except UnsplittableProjection as e:  # the projection stays whole (q for every row): say why
        ctx.report.unsplit_projections[start.name] = e.reason
        return
    split_fused_projection(ctx, proj, full_attn_in, ab.attn_in, ab.rows, ab.stage)


def _kept_mask_rows(ab: _Block, core: fx.Node, qdim: Optional[int]) -> None:
    """The core's mask keeps the first ``K_i`` query rows of each segment along ``qdim`` (None: the
    mask has no token dim there, nothing to do)."""
    if qdim is not None:
        with ab.ctx.g.inserting_before(core):
            set_mask(core, ab.prefix_rows(mask_of(core), qdim, f"{core.name}_mask_kept"))


def _narrow_one_stage(ab: _Block) -> None:
    ctx, blk, st, td = ab.ctx, ab.blk, ab.st, ab.ctx.gmap.token_dim
    with ctx.g.inserting_before(blk.nodes[0]):
        rec = ctx.insert(ipcv_ops.ngr, (ab.rows, st["x_rem"], st["x_keep"], st["nbr_idx"], st["nbr_w"]),
                         dict(token_dim=td), f"ipcv_ngr_as{blk.index}")
        x_all = ctx.concat_rows(ab.rows, rec, td, ab.stage, f"ipcv_rows_as{blk.index}")
    full_attn_in = _copy_attention_input(ab, x_all)
    # each core's mask, read before the rewrite of its queries (its query rows follow them)
    mask_qdim = {c: ab.token_mask_dim(c) for c in ab.cores}
    replace_side_inputs(list(blk.attn_nodes) + ab.copies, ab.done.side(ab.stage, "as"))
    prefix = []
    for core in ab.cores:
        if not narrow_queries(ab, core, full_attn_in):
            prefix.append(core)
        else:  # compact queries: the mask's query rows too
            _kept_mask_rows(ab, core, mask_qdim[core])
    full, kept = ctx.layout.lengths, ctx.lengths(ab.stage)
    if full is None:  # one segment per row: the kept rows are the first K of every row
        for core in prefix:
            q = core.args[0]
            with ctx.g.inserting_before(core):
                core.args = (ab.prefix_rows(q, q.meta["val"].dim() - 2, f"{q.name}_kept"),) + tuple(core.args[1:])
            _kept_mask_rows(ab, core, mask_qdim[core])
            ctx.report.query_gathers += 1
        return
    as_rows = ab.done.as_positions[ab.stage]
    split_attention(ctx, blk, prefix, kept, full, q_prefix=True, kv_rows=as_rows)
    split_attention(ctx, blk, [c for c in ab.cores if c not in prefix], kept, full, q_rows=st["positions"],
                    kv_rows=as_rows)


def _narrow_several_stages(ab: _Block) -> None:
    ctx, blk = ab.ctx, ab.blk
    stages = ab.done.stages[:ab.stage + 1]
    x_all = ctx.reconstruct(ab.rows, stages, ctx.g.inserting_before(blk.nodes[0]), f"ipcv_reconstruct_as{blk.index}")
    _copy_attention_input(ab, x_all)
    pos, hidden_val = ab.st["positions"], ctx.gmap.hidden.meta["val"]
    for core in ab.cores:
        q = core.args[0]
        with ctx.g.inserting_before(core):
            qk = ctx.insert(ipcv_ops.gather_tokens, (q, pos), dict(dims=[q.meta["val"].dim() - 2], batch="full"))
            ctx.report.query_gathers += 1
            core.args = (qk,) + tuple(core.args[1:])
            d = ab.token_mask_dim(core)
            if d is not None:
                mode = batch_mode(mask_of(core).meta["val"], (d,), hidden_val, ctx.gmap.token_dim)
                set_mask(core, ctx.insert(ipcv_ops.gather_tokens, (mask_of(core), pos), dict(dims=[d], batch=mode)))
    split_attention(ctx, blk, ab.cores, ctx.lengths(ab.stage), ctx.layout.lengths, q_rows=pos)


class AttentionStabilisationPass(RewriteStep):
    """Every AS block: keys / values over all rows, queries for the kept rows."""

    def run(self, ctx: RewriteContext) -> bool:
        plans = [p for p in ctx.pruned() if p.as_block]
        done = Rewritten.read(ctx.g)
        for plan in plans:
            ab = _Block(ctx, done, plan)
            (_narrow_one_stage if len(ab.done.stages) == 1 else _narrow_several_stages)(ab)
        return bool(plans)
