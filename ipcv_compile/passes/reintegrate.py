"""Reintegration: after the last block, ``ipcv.reconstruct`` (NGR + restore through every stage)
gives the consumers of the block stack's output (final norm, merger, ...) the full length in the
original order; the same for every *tap* (an intermediate block output the stack returns —
deepstack features, a feature layer: one reconstruct per tap, through the stages up to that block)."""

from __future__ import annotations

from typing import List

from torch import fx

from .context import RewriteContext, RewriteError, RewriteStep
from .nodes import Rewritten

__all__ = ["ReintegratePass"]


class ReintegratePass(RewriteStep):
    """The full sequence for the consumers of the last block's output and of each tap."""

    def run(self, ctx: RewriteContext) -> bool:
        if not ctx.config.reintegrate or ctx.keeps_all:
            return False
        done = Rewritten.read(ctx.g)
        changed = False
        last = ctx.schedule[-1]
        for plan in ctx.pruned():
            if plan is last:
                users: List[fx.Node] = list(ctx.gmap.final_users)
                name = "ipcv_reconstruct"
            elif plan.tap:
                users, name = list(ctx.gmap.taps.get(plan.index, [])), f"ipcv_reconstruct_tap{plan.index}"
            else:
                continue
            out = ctx.block(plan).output
            if users:
                stages = done.stages[:ctx.ffn_stage(plan) + 1]
                full = ctx.reconstruct(out, stages, ctx.g.inserting_before(out.next), name)
                for u in users:
                    u.replace_input_with(out, full)
                changed = True
        return changed

    def ensures(self, gm: fx.GraphModule) -> None:
        ctx = RewriteContext.of(gm)
        if not ctx.config.reintegrate or ctx.keeps_all:
            return
        out = ctx.gmap.blocks[-1].output
        stale = [u.name for u in ctx.gmap.final_users if out in u.all_input_nodes]
        if stale:
            raise RewriteError(f"{stale} still read the last block's kept rows (not reintegrated)")
