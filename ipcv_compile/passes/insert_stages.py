"""Insert the prune stages: one ``ipcv.prune`` per stage of the :class:`~ipcv_core.schedule.Schedule`.

* at a block's input (the default placement): the op scores the rows entering the block (eq. 1
  reads the rows entering the previous block too), and the block reads its kept rows
  (:func:`feed_residual`);
* after the attention (``placement="post_attention"``): between the block's attention residual add
  (:func:`attention_residual`) and its FFN — the op scores ``h = x + A(x)`` (the block input ``x``
  as the previous rows) and the FFN, the rest of the block and the later blocks read the kept rows.

Each prune node is tagged ``role="prune", stage=i``, its outputs ``role="stage_output"``; a stage
reads the positions (and sizes) of the one before.  The key metric of key-metric selection rules is
added by :mod:`.key_metric` (the ``metric`` argument is None here).
"""

from __future__ import annotations

from typing import Dict, List

from torch import fx

from ipcv_core.prune import PruneOutputs
from ipcv_core.schedule import BlockPlan

from .. import ops as ipcv_ops
from ..locate import BlockInfo, ancestors_within
from .context import RewriteContext, RewriteError, RewriteStep
from .nodes import Rewritten, tag

__all__ = ["InsertStagesPass", "feed_residual", "attention_residual"]


def feed_residual(blk: BlockInfo, rows: fx.Node) -> None:
    """The block reads ``rows`` as its residual stream."""
    for n in blk.nodes:
        n.replace_input_with(blk.input, rows)


def attention_residual(blk: BlockInfo, rows: fx.Node, cores: List[fx.Node]) -> fx.Node:
    """The block's residual stream after its attention (``h = x + A(x)``, what its FFN reads): the
    one residual add that depends on the attention output and that the FFN input depends on, with
    the block input ``rows`` reaching the rest of the block only through it (``out = h + F(h)``)."""
    within = set(blk.nodes) | set(cores)
    to_ffn = ancestors_within(blk.ffn_input, within)
    mids = [a for a in blk.residual_adds if a in to_ffn and blk.attn_output in ancestors_within(a, within)]
    if len(mids) != 1:
        raise RewriteError(f"block {blk.index}: a post-attention stage needs one residual add between the attention "
                           f"and the FFN (h = x + A(x); out = h + F(h)), found {[a.name for a in mids]}")
    mid = mids[0]
    before = ancestors_within(mid, within)
    stray = [u.name for u in rows.users if u in within and u not in before]
    if stray:
        raise RewriteError(f"block {blk.index}: the block input feeds {stray} besides the attention residual; a "
                           "post-attention stage needs h = x + A(x); out = h + F(h)")
    return mid


def _prune(ctx: RewriteContext, plan: BlockPlan, rows: fx.Node, prev_rows: fx.Node,
           stages: List[Dict[str, fx.Node]]) -> Dict[str, fx.Node]:
    """One ``ipcv.prune`` of ``rows`` at the graph's insertion point, and its tagged outputs."""
    cfg, i = ctx.config, plan.stage
    last = stages[-1] if stages else {}
    args = (rows, prev_rows, ctx.gmap.hidden, last.get("positions"), None,
            last.get("log_size") if cfg.merge_rule.tracks_sizes else None)
    node = ctx.insert(ipcv_ops.prune, args, ctx.prune_kwargs(i),
                      f"ipcv_prune{i}" if len(ctx.schedule.stages) > 1 else "ipcv_prune")
    tag(node, role="prune", stage=i)
    outs = {f: tag(ctx.getitem(node, j), role="stage_output", stage=i, field=f)
            for j, f in enumerate(PruneOutputs._fields)}
    return {**outs, "prune": node}


class InsertStagesPass(RewriteStep):
    """One ``ipcv.prune`` per stage, at its block's input or after its attention."""

    def requires(self, gm: fx.GraphModule) -> None:
        ctx = RewriteContext.of(gm)
        if Rewritten.read(ctx.g).stages:
            raise RewriteError("this graph already holds IPCV prune stages (rewrite the captured graph, once)")

    def run(self, ctx: RewriteContext) -> bool:
        stages: List[Dict[str, fx.Node]] = []
        rows_in = {}  # block -> the residual stream entering it, as rewritten
        for plan in ctx.pruned():
            blk = ctx.block(plan)
            rows = rows_in[plan.index] = blk.input
            if plan.stage is None:
                continue
            prev = rows_in.get(plan.index - 1, ctx.gmap.blocks[max(plan.index - 1, 0)].input)
            if plan.stage_after_attention:
                mid = attention_residual(blk, rows, list(blk.attn_cores))
                with ctx.g.inserting_before(mid.next):  # new nodes in order, right after the residual add
                    st = _prune(ctx, plan, mid, rows, stages)
                mid.replace_all_uses_with(st["x_keep"], delete_user_cb=lambda u, p=st["prune"]: u is not p)
            else:
                with ctx.g.inserting_before(blk.nodes[0]):
                    st = _prune(ctx, plan, rows, prev, stages)
                rows_in[plan.index] = st["x_keep"]
                feed_residual(blk, st["x_keep"])
            stages.append(st)
        return bool(stages)

    def ensures(self, gm: fx.GraphModule) -> None:
        ctx = RewriteContext.of(gm)
        got = len(Rewritten.read(ctx.g).stages)
        want = 0 if ctx.keeps_all else len(ctx.schedule.stages)
        if got != want:
            raise RewriteError(f"{got} prune stages inserted, the schedule has {want}")
