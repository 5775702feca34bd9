"""Proportional attention for merge rules that track sizes: every SDPA of a block that runs on a
stage's kept rows (not an AS block) adds ``log(size)`` of its keys (``ipcv.attention_bias``)."""

from __future__ import annotations

from .. import ops as ipcv_ops
from .context import RewriteContext, RewriteStep
from .nodes import Rewritten, mask_of, set_mask

__all__ = ["SizeBiasPass"]


class SizeBiasPass(RewriteStep):
    """``ipcv.attention_bias`` on the kept-row blocks' attention (no-op unless the merge rule asks)."""

    def run(self, ctx: RewriteContext) -> bool:
        if not ctx.config.merge_rule.attention_bias:
            return False
        done = Rewritten.read(ctx.g)
        for plan in ctx.pruned():
            stage = ctx.attention_stage(plan)
            if plan.as_block or stage is None:
                continue
            for core in done.cores.get(plan.index, []):
                with ctx.g.inserting_before(core):
                    bias = ctx.insert(ipcv_ops.attention_bias, (mask_of(core), done.stages[stage]["log_size"]),
                                      dict(dtype=core.args[0].meta["val"].dtype))
                set_mask(core, bias)
        return True
