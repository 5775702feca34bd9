"""Per-token side inputs (rotary cos / sin, masks: values from outside the blocks with a token dim)
follow the rows: gathered once per stage, then used by the blocks that run on that stage's rows.

* :class:`GatherSideInputsPass` — after each stage, every side input that a block reading the
  stage's kept rows uses is gathered to them once (``ipcv.gather_tokens``, tagged
  ``role="side_input", rows="kept"``); with one stage and AS blocks, also to the AS rows
  ``[kept_i; removed_i]`` per segment (``rows="as"``; their positions ``role="as_positions"``).
* :class:`UseSideInputsPass` — each block's own nodes read the side inputs gathered to the rows
  they run on (an AS block's attention reads the AS rows' ones: :mod:`.attention_stabilisation`);
  nodes copied by the rewrite read their own.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

from torch import fx

from ipcv_core.prune import PruneOutputs

from .. import ops as ipcv_ops
from ..locate import BlockInfo, descendants_within
from .context import RewriteContext, RewriteStep
from .nodes import Rewritten, batch_mode, node_order, tag

__all__ = ["GatherSideInputsPass", "UseSideInputsPass", "gather_side_inputs", "replace_side_inputs"]


def gather_side_inputs(ctx: RewriteContext, blocks: Iterable[BlockInfo], pos: fx.Node, after: fx.Node,
                       stage: int, rows: str, have: Optional[Dict[fx.Node, fx.Node]] = None) -> Dict[fx.Node, fx.Node]:
    """Side inputs used by ``blocks`` gathered once to the rows of ``pos`` (except those in ``have``),
    inserted after ``after`` (or after the side value itself when that comes later); tagged with
    ``stage`` and ``rows`` (``"kept"``, ``"as"``, ``"pre"``)."""
    out: Dict[fx.Node, fx.Node] = {}
    have = have or {}
    order = node_order(ctx.g)
    gmap = ctx.gmap
    hidden_val = gmap.hidden.meta["val"]
    suffix = {"kept": "", "as": "as", "pre": "pre"}[rows]
    for blk in blocks:
        for s_ in blk.side_uses:
            if s_ in out or s_ in have:
                continue
            dims = gmap.side_inputs[s_]
            mode = batch_mode(s_.meta["val"], dims, hidden_val, gmap.token_dim)
            with ctx.g.inserting_after(s_ if order.get(s_, -1) > order.get(after, 10**9) else after):
                out[s_] = ctx.insert(ipcv_ops.gather_tokens, (s_, pos), dict(dims=list(dims), batch=mode),
                                     f"{s_.name}_kept{stage}{suffix}")
            tag(out[s_], role="side_input", stage=stage, rows=rows)
            ctx.report.side_inputs[s_.name] = dims
    return out


def replace_side_inputs(nodes: Iterable[fx.Node], gathered: Dict[fx.Node, fx.Node]) -> None:
    """``nodes`` read the gathered side inputs instead of the full ones."""
    for n in nodes:
        for s_, s_k in gathered.items():
            if s_ in n.all_input_nodes:
                n.replace_input_with(s_, s_k)


class GatherSideInputsPass(RewriteStep):
    """Each stage's side inputs, gathered once to its kept rows (and to the AS rows)."""

    def run(self, ctx: RewriteContext) -> bool:
        done = Rewritten.read(ctx.g)
        plans = ctx.pruned()
        for i, st in enumerate(done.stages):
            using = [p for p in plans if i in (ctx.attention_stage(p), ctx.ffn_stage(p))]
            last = st[PruneOutputs._fields[-1]]
            gather_side_inputs(ctx, [ctx.block(p) for p in using], st["positions"], last, i, "kept")
            as_blocks = [ctx.block(p) for p in using if p.as_block]
            if as_blocks and len(done.stages) == 1:  # the AS rows [kept_i; removed_i] per segment
                with ctx.g.inserting_before(last.next):
                    as_rows = ctx.concat_rows(st["positions"], st["rem_idx"], 1, i, "ipcv_as_positions")
                tag(as_rows, role="as_positions", stage=i)
                gather_side_inputs(ctx, as_blocks, as_rows, as_rows, i, "as")
        return bool(ctx.report.side_inputs)


class UseSideInputsPass(RewriteStep):
    """The blocks' own nodes read the side inputs at their rows (an AS block's attention excepted)."""

    def run(self, ctx: RewriteContext) -> bool:
        done = Rewritten.read(ctx.g)
        for plan in ctx.pruned():
            blk = ctx.block(plan)
            skip = set(blk.attn_nodes) if plan.as_block else set()
            after: Sequence[fx.Node] = ()
            if plan.stage_after_attention:  # the rest of the block (its FFN) reads the new stage's rows
                after = descendants_within(done.stages[plan.stage]["x_keep"], set(blk.nodes))
                replace_side_inputs(after, done.side(plan.stage))
            replace_side_inputs([n for n in blk.nodes if n not in skip and n not in after],
                                done.side(ctx.attention_stage(plan)))
        return bool(done.gathered)
