"""Per-segment attention: each image / frame / window attends to its own rows only.

:class:`SegmentAttentionPass` turns every SDPA of a block that is not an AS block (those are split by
:mod:`.attention_stabilisation`, with :func:`split_attention` too) into ``ipcv.segment_attention``
over the rows that reach it: the layout's segments before the first stage (or everywhere when no
stage removes anything), the kept rows of the last stage after it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from torch import fx

from .. import ops as ipcv_ops
from ..locate import BlockInfo
from .context import RewriteContext, RewriteError, RewriteStep
from .nodes import Rewritten, tag

__all__ = ["SegmentAttentionPass", "split_attention"]


def _window_groups(ctx: RewriteContext, blk: BlockInfo, q_lengths, kv_lengths, q_prefix: bool,
                   q_rows: Optional[fx.Node], kv_rows: Optional[fx.Node]):
    """Windowed blocks: ``(q_lengths, kv_lengths, groups)`` — rows in their original order attend per
    window (the windows are the segments); rows after a stage attend per frame among the rows of
    their own window (``groups``: ``(q_groups, kv_groups)``)."""
    if not ctx.windowed(blk):
        return q_lengths, kv_lengths, None
    if q_rows is None and kv_rows is None and not q_prefix:
        windows = tuple(w for ws in ctx.layout.windows for w in ws)
        return windows, windows, None
    return q_lengths, kv_lengths, (None if q_prefix else ctx.window_groups(q_rows), ctx.window_groups(kv_rows))


def split_attention(ctx: RewriteContext, blk: BlockInfo, cores: Sequence[fx.Node], q_lengths, kv_lengths,
                    q_prefix: bool = False, q_rows: Optional[fx.Node] = None,
                    kv_rows: Optional[fx.Node] = None) -> Dict[fx.Node, fx.Node]:
    """Packed rows: each of ``cores`` (SDPA nodes of ``blk``) becomes ``ipcv.segment_attention`` over
    the static segment lengths — no mask spans two segments (equal runs of segments are one batched
    SDPA).  One segment per row: nothing to do.  ``q_rows`` / ``kv_rows``: the rows' original
    positions (None = all rows in order), for windowed blocks.  Returns ``{old core: new core}``."""
    q_lengths, kv_lengths, groups = _window_groups(ctx, blk, q_lengths, kv_lengths, q_prefix, q_rows, kv_rows)
    if q_lengths is None or (len(q_lengths) == 1 and not q_prefix and groups is None):
        return {}
    new: Dict[fx.Node, fx.Node] = {}
    for core in cores:
        q, k, v = core.args[:3]
        kw = dict(core.kwargs)
        kw.update(zip(("attn_mask", "dropout_p", "is_causal"), core.args[3:]))
        if kw.get("dropout_p", 0.0) or kw.get("is_causal", False):
            raise RewriteError(f"{core.name}: per-segment attention needs dropout_p=0 and is_causal=False")
        with ctx.g.inserting_before(core):
            seg = ctx.insert(ipcv_ops.segment_attention, (q, k, v, kw.get("attn_mask"), *(groups or (None, None))),
                             dict(q_lengths=list(q_lengths), kv_lengths=list(kv_lengths), q_prefix=q_prefix,
                                  scale=kw.get("scale"), enable_gqa=bool(kw.get("enable_gqa", False))))
        seg.meta = dict(core.meta)
        tag(seg, role="attention_core")
        core.replace_all_uses_with(seg)
        ctx.g.erase_node(core)
        new[core] = seg
    return new


class SegmentAttentionPass(RewriteStep):
    """Every non-AS block's attention within each segment of the rows that reach it."""

    def run(self, ctx: RewriteContext) -> bool:
        done = Rewritten.read(ctx.g)
        changed = False
        for plan in ctx.schedule:
            if plan.as_block and not ctx.keeps_all:
                continue
            stage = None if ctx.keeps_all else ctx.attention_stage(plan)
            rows = None if stage is None else done.stages[stage]["positions"]
            lengths = ctx.lengths(stage)
            blk = ctx.block(plan)
            changed |= bool(split_attention(ctx, blk, done.cores.get(plan.index, []), lengths, lengths,
                                            q_rows=rows, kv_rows=rows))
        return changed

    def ensures(self, gm: fx.GraphModule) -> None:
        ctx = RewriteContext.of(gm)
        if ctx.layout.lengths is None or len(ctx.layout.lengths) == 1:
            return
        left: List[str] = [c.name for b, cs in Rewritten.read(ctx.g).cores.items() for c in cs
                           if c.target is not ipcv_ops.segment_attention]
        if left:
            raise RewriteError(f"attention cores {left} still attend across segments of a packed layout")
