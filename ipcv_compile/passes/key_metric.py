"""The key metric of key-metric selection rules (ToMe's bipartite matching on attention keys).

For a stage at a block's input, the block's attention keys on the rows *entering* it (before the
stage prunes them): every node of the block the SDPA key depends on is copied onto those rows
(and the side inputs gathered to them; ``copy="key"``), head-averaged by ``ipcv.key_metric``.  For
a stage after the attention, the SDPA's own key input.  The stage's ``ipcv.prune`` reads it.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from torch import fx

from ipcv_core.config import IPCVConfig

from .. import ops as ipcv_ops
from ..locate import BlockInfo, GraphMap, ancestors_within, descendants_within
from .context import RewriteContext, RewriteError, RewriteStep
from .nodes import Rewritten, node_order, tag
from .side_inputs import gather_side_inputs

__all__ = ["KeyMetricPass", "check_key_metric_cores"]


def _hoist(blk: BlockInfo, prune: fx.Node, anc: set, env: Dict[fx.Node, fx.Node], x_keep: fx.Node) -> None:
    """Values the key path reads from outside the block (e.g. rotary tables computed late in the
    graph) must exist before the copies: move them (with their own late inputs) up, before the
    stage's prune."""
    order = node_order(prune.graph)
    rows = prune.args[0]

    def hoist(n):
        if order[n] < order[prune]:
            return
        if n in (blk.input, x_keep, rows) or n in anc or descendants_within(blk.input, {n}) \
                or descendants_within(x_keep, {n}):
            raise RewriteError(f"block {blk.index}: the key path reads {n.name}, computed after the block starts")
        for a in n.all_input_nodes:
            hoist(a)
        prune.prepend(n)
        order[n] = order[prune] - 0.5

    for n in anc:
        for a in n.all_input_nodes:
            if a not in anc:
                hoist(env.get(a, a))


def copy_key_path(ctx: RewriteContext, blk: BlockInfo, st: Dict[str, fx.Node],
                  side_map: Dict[fx.Node, fx.Node]) -> Tuple[fx.Node, List[fx.Node]]:
    """The block's attention keys on the rows entering stage ``st`` (its prune's input), reading
    ``side_map`` (side inputs at those rows), inserted before the prune; for a fused qkv projection
    the copy computes q and v too.  Returns ``(metric, copies)``.  The block holds one attention
    core (:func:`check_key_metric_cores`, the pass's precondition)."""
    prune, x_keep = st["prune"], st["x_keep"]
    key = blk.attn_cores[0].args[1]
    anc = ancestors_within(key, set(blk.nodes))
    if x_keep not in {a for n in anc for a in n.all_input_nodes}:
        raise RewriteError(f"block {blk.index}: the attention keys do not depend on the block input")
    env = {x_keep: prune.args[0], **side_map}
    _hoist(blk, prune, anc, env, x_keep)
    copies = []
    with ctx.g.inserting_before(prune):
        for n in blk.nodes:
            if n not in anc:
                continue
            c = ctx.g.node_copy(n, lambda a: env.get(a, a))
            c.meta = dict(n.meta)
            env[n] = tag(c, copy="key")
            copies.append(c)
            ctx.report.key_copies += 1
        metric = ctx.insert(ipcv_ops.key_metric, (env[key],), name=f"ipcv_keys{blk.index}")
    return metric, copies


def check_key_metric_cores(config: IPCVConfig, gmap: GraphMap) -> None:
    """Key-metric selections read one attention's keys per block: every block must hold exactly one
    attention core (SDPA)."""
    if not config.needs_key_metric:
        return
    for blk in gmap.blocks:
        if len(blk.attn_cores) != 1:
            raise RewriteError(f"selection={config.selection!r} needs exactly one attention core (SDPA) "
                               f"in block {blk.index}, found {len(blk.attn_cores)}")


def _set_metric(prune: fx.Node, metric: fx.Node) -> None:
    prune.args = prune.args[:4] + (metric,) + prune.args[5:]


class KeyMetricPass(RewriteStep):
    """Key-metric selection rules: each stage's ``ipcv.prune`` reads its block's keys (no-op else)."""

    def requires(self, gm: fx.GraphModule) -> None:
        ctx = RewriteContext.of(gm)
        check_key_metric_cores(ctx.config, ctx.gmap)

    def run(self, ctx: RewriteContext) -> bool:
        if not ctx.config.needs_key_metric:
            return False
        done = Rewritten.read(ctx.g)
        for plan in ctx.pruned():
            if plan.stage is None:
                continue
            blk, st = ctx.block(plan), done.stages[plan.stage]
            if plan.stage_after_attention:  # the SDPA's own key input
                with ctx.g.inserting_before(st["prune"]):
                    metric = ctx.insert(ipcv_ops.key_metric, (blk.attn_cores[0].args[1],),
                                        name=f"ipcv_keys{blk.index}")
            else:
                prev = plan.stage - 1 if plan.stage else None
                side_now = dict(done.side(prev))
                if prev is not None:  # side inputs at the incoming rows that are not gathered yet
                    pos = done.stages[prev]["positions"]
                    side_now.update(gather_side_inputs(ctx, [blk], pos, pos, plan.stage, "pre", side_now))
                metric, _ = copy_key_path(ctx, blk, st, side_now)
            _set_metric(st["prune"], metric)
        return True
