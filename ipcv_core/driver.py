"""Eager IPCV driver: runs a pre-norm block stack with IPCV given per-block branch callables.

A pre-norm ViT block is ``h = x + A(x); out = h + F(h)``, where the *attention branch* ``A`` includes
the norm before attention and any LayerScale after it, and the *FFN branch* ``F`` likewise.  The
driver only needs, per block, an object with

* ``attention_branch(x_q, x_kv, ctx) -> (B, Lq, D)``: the attention update for the query rows
  ``x_q (B, Lq, D)``, attending over the key/value rows ``x_kv (B, Lkv, D)``.  ``ctx``
  (:class:`AttnContext`) gives the rows' original positions (to gather rotary tables), where each
  query row sits among the kv rows, and the segment mask.
* ``ffn_branch(x) -> (B, L, D)``: the FFN update, row-wise.

This is all a serving engine with its own (non-exportable) ViT code must provide to use IPCV, and it
is the oracle the graph rewrite is tested against.

Schedule (blocks numbered from 0, ``l_p = prune_layer``, ``Δ = as_depth``):

* blocks ``< l_p``: unchanged.
* at the input of block ``l_p``: score, select per segment, find neighbours (all at ``H_lp``).
* blocks in ``[l_p, l_p+Δ)`` (AS): removed rows are NGR-reconstructed from the kept rows and join
  attention as keys/values only; queries are computed for kept rows only; FFN on kept rows only.
* blocks ``>= l_p+Δ``: kept rows only.
* ``placement="post_attention"``: a stage's block runs its attention on the incoming rows, the
  stage prunes ``x + A(x)`` (matching on that attention's keys), the FFN runs on the kept rows.
* after the last block: removed rows reconstructed by NGR and put back in place (reintegration).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch

from .config import IPCVConfig
from .prune import PruneOutputs, kept_lengths, prune_stage, reconstruct_nested, stage_plan
from .schedule import Schedule
from .segments import SegmentLayout, SegmentPlan
from .selection import compact

__all__ = ["AttnContext", "Block", "Branches", "DriverOutput", "attend", "attend_with_keys", "run_blocks", "run_ipcv"]


@dataclass(frozen=True)
class AttnContext:
    """What an attention branch needs to know about the rows it is given.

    Attributes:
        q_pos: ``(B, Lq)`` original token positions of the query rows; None = ``arange(N)``.
        kv_pos: ``(B, Lkv)`` original positions of the key/value rows; None = ``arange(N)``.
        q_in_kv: ``(B, Lq)`` index of each query row among the kv rows; None = the same rows.
        mask: ``(B, 1, Lq, Lkv)`` bool, True = may attend; None = no masking needed.
        bias: ``(B, 1, 1 or Lq, Lkv)`` float added to the attention logits (e.g. ToMe's
            proportional attention, ``log(size)``); None = no bias.
    """

    q_pos: Optional[torch.Tensor] = None
    kv_pos: Optional[torch.Tensor] = None
    q_in_kv: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    def sdpa_mask(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``attn_mask`` for ``F.scaled_dot_product_attention``: the bool mask, or the float bias
        (with ``-inf`` where the mask forbids) when a bias is present."""
        if self.bias is None:
            return self.mask
        bias = self.bias.to(dtype)
        if self.mask is None:
            return bias
        return bias.masked_fill(~self.mask, float("-inf"))

    def segment(self, q_lo: int, q_len: int, kv_lo: int, kv_len: int) -> "AttnContext":
        """The context of one segment: query rows ``[q_lo, q_lo+q_len)`` over kv rows
        ``[kv_lo, kv_lo+kv_len)`` (positions — ``arange`` where they were implicit —, query-in-kv
        indices, mask and bias sliced)."""
        def pos(t, lo, n):
            if t is None:
                return torch.arange(lo, lo + n).unsqueeze(0)
            return t[:, lo:lo + n]

        return AttnContext(
            q_pos=pos(self.q_pos, q_lo, q_len),
            kv_pos=pos(self.kv_pos, kv_lo, kv_len),
            q_in_kv=None if self.q_in_kv is None else self.q_in_kv[:, q_lo:q_lo + q_len] - kv_lo,
            mask=None if self.mask is None else self.mask[..., q_lo:q_lo + q_len, kv_lo:kv_lo + kv_len],
            bias=None if self.bias is None else self.bias[..., kv_lo:kv_lo + kv_len],
        )


def attend(blk, x_q: torch.Tensor, x_kv: torch.Tensor, ctx: AttnContext,
           q_lengths: Optional[Sequence[int]] = None, kv_lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``blk.attention_branch`` with attention inside each segment only: packed rows (static
    ``q_lengths`` / ``kv_lengths``, segments back to back) are attended segment by segment, so no
    mask spans two segments; ``None``: the rows form one segment.  A block with
    ``attention_segments`` (e.g. a serving engine's variable-length attention) gets all segments
    in one call and keeps them apart itself."""
    packed = getattr(blk, "attention_segments", None)
    if packed is not None and q_lengths is not None:
        return packed(x_q, x_kv, ctx, tuple(q_lengths), tuple(kv_lengths))
    if q_lengths is None or len(q_lengths) == 1:
        return blk.attention_branch(x_q, x_kv, ctx)
    outs, qo, ko = [], 0, 0
    for ql, kl in zip(q_lengths, kv_lengths):
        outs.append(blk.attention_branch(x_q[:, qo:qo + ql], x_kv[:, ko:ko + kl], ctx.segment(qo, ql, ko, kl)))
        qo, ko = qo + ql, ko + kl
    return torch.cat(outs, dim=1)


class Block(Protocol):
    """Per-block callables.  ``key_features(x, pos=None)`` is optional (used by key-matching
    baselines such as ToMe and by ``selection="bipartite"``): the attention keys of rows ``x`` as
    the attention core sees them (norm applied; rotary at the rows' original positions ``pos``,
    None = ``0..L-1``), averaged over heads, ``(B, L, C)``.  ``attention_with_keys(x_q, x_kv,
    ctx) -> (update, keys)`` is optional too: the attention update and the head-averaged keys of
    the kv rows that this attention computed (post-attention stages and ToMe match on them without
    projecting the keys a second time); without it the driver calls ``key_features`` on the kv rows
    (the same values, one more key projection in eager mode)."""

    def attention_branch(self, x_q: torch.Tensor, x_kv: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...

    def ffn_branch(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Branches:
    """Adapts two plain callables to the :class:`Block` protocol."""

    attention: Callable[[torch.Tensor, torch.Tensor, AttnContext], torch.Tensor]
    ffn: Callable[[torch.Tensor], torch.Tensor]
    keys: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # (x_q, x_kv, ctx) -> (update, head-averaged keys of x_kv as this attention computed them)
    attention_keys: Optional[Callable] = None
    # (x_q, x_kv, ctx, q_lengths, kv_lengths) -> update: all segments of packed rows in one call
    segments: Optional[Callable] = None

    def attention_branch(self, x_q, x_kv, ctx):
        return self.attention(x_q, x_kv, ctx)

    def attention_with_keys(self, x_q, x_kv, ctx):
        """``(update, keys)``: the attention update of the query rows and the head-averaged keys of
        the kv rows (the attention's own, with ``attention_keys``; else ``key_features`` of the kv
        rows — the same values at the cost of one more key projection)."""
        if self.attention_keys is not None:
            return self.attention_keys(x_q, x_kv, ctx)
        return self.attention(x_q, x_kv, ctx), self.key_features(x_kv, ctx.kv_pos)

    def ffn_branch(self, x):
        return self.ffn(x)

    @property
    def attention_segments(self) -> Optional[Callable]:
        """The ``segments`` callable, or None (then the driver attends segment by segment)."""
        return self.segments

    def key_features(self, x, pos=None):
        """Head-averaged attention keys of rows ``x`` as the attention core sees them; ``pos
        (B, L)``: the rows' original positions (rotary towers), None = ``0..L-1``."""
        if self.keys is None:
            raise NotImplementedError("this block provides no key_features")
        return self.keys(x) if pos is None else self.keys(x, pos)

    @classmethod
    def per_layer(cls, layers, attention, ffn, keys=None, attention_keys=None) -> List["Branches"]:
        """One ``Branches`` per layer from functions taking the layer first:
        ``attention(layer, x_q, x_kv, ctx)``, ``ffn(layer, x)``, ``keys(layer, x)``,
        ``attention_keys(layer, x_q, x_kv, ctx) -> (update, keys)``."""
        return [
            cls(functools.partial(attention, layer), functools.partial(ffn, layer),
                None if keys is None else functools.partial(keys, layer),
                None if attention_keys is None else functools.partial(attention_keys, layer))
            for layer in layers
        ]


@dataclass
class DriverOutput:
    hidden_states: torch.Tensor  # (B, N, D) with reintegration, else (B, K, D)
    keep_idx: torch.Tensor  # (B, K) original positions kept to the end
    rem_idx: torch.Tensor  # (B, R) original positions removed (at any stage)
    nbr_idx: torch.Tensor  # (B, R_last, k) of the last stage, into its kept list
    nbr_weights: torch.Tensor  # (B, R_last, k)
    scores: torch.Tensor  # (B, N) scores of the first stage
    plan: SegmentPlan  # of the last stage
    stages: List[PruneOutputs] = field(default_factory=list)  # every prune stage, in order
    taps: Dict[int, torch.Tensor] = field(default_factory=dict)  # block -> its output, full length (taps=)
    metric_dims: List[Optional[int]] = field(default_factory=list)  # per stage: width of its matching metric


def run_blocks(h: torch.Tensor, blocks: Sequence[Block], layout: SegmentLayout | None = None,
               taps: Sequence[int] = (), tapped: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
    """The plain block stack (no pruning), through the same branch callables; attention within
    each segment of ``layout``.  ``taps``: blocks whose outputs are also stored in ``tapped``."""
    lengths = (layout or SegmentLayout()).lengths
    ctx = AttnContext()
    for li, blk in enumerate(blocks):
        h = h + attend(blk, h, h, ctx, lengths, lengths)
        h = h + blk.ffn_branch(h)
        if li in taps and tapped is not None:
            tapped[li] = h
    return h


def run_ipcv(
    h: torch.Tensor,
    blocks: Sequence[Block],
    config: IPCVConfig | Schedule,
    layout: SegmentLayout | None = None,
    taps: Sequence[int] = (),
) -> DriverOutput:
    """Run ``blocks`` on ``h (B, N, D)`` with IPCV as ``config`` says (a :class:`Schedule`, or an
    :class:`IPCVConfig` laid out with :meth:`Schedule.build` over ``len(blocks)`` blocks; ``selection``
    names the selection rule, other rules are added with :func:`ipcv_core.rules.register_selection`).  Attention stays
    within each segment (image / frame) of ``layout``: packed segments are attended one by one.
    ``taps``: blocks whose outputs are returned too (``DriverOutput.taps``), restored to the full
    sequence by NGR through the stages so far (as the final output)."""
    if h.dim() != 3:
        raise ValueError(f"hidden states must be (B, N, D), got shape {tuple(h.shape)}")
    layout = layout or SegmentLayout()
    schedule = Schedule.build(config, len(blocks))
    config = schedule.config
    B, N, D = h.shape
    full = layout.lengths  # per-segment rows (None: one segment per batch row)
    rows_now = full  # per-segment rows of the current residual stream
    ctx = AttnContext()

    stages: List[PruneOutputs] = []
    tapped: Dict[int, torch.Tensor] = {}
    x, x_prev = h, h
    as_ctx = None
    metric_dims: List[Optional[int]] = []

    def stage_at(plan, rows, rows_prev, metric):
        """Prune stage of block ``plan`` on ``rows`` (``rows_prev``: the rows eq. 1 compares with)."""
        nonlocal ctx, rows_now, as_ctx
        metric_dims.append(None if metric is None else int(metric.shape[-1]))
        pos = stages[-1].positions if stages else None
        st = prune_stage(rows, rows_prev, h, layout, config, plan.stage, positions=pos, metric=metric,
                         log_size=stages[-1].log_size if stages else None)
        stages.append(st)
        pos = st.positions
        rows_now = kept_lengths(layout, config, plan.stage, N)
        ctx = AttnContext(q_pos=pos, kv_pos=pos,
                          bias=st.log_size[:, None, None, :] if config.merge_rule.attention_bias else None)
        as_ctx = AttnContext(q_pos=pos, kv_pos=None, q_in_kv=pos)  # read by the AS blocks that follow
        return st.x_keep

    for plan, blk in zip(schedule, blocks):
        li = plan.index
        if plan.stage_at_input:
            pos = stages[-1].positions if stages else None
            metric = _key_metric(blk, x, pos) if config.needs_key_metric else None
            x = stage_at(plan, x, x_prev, metric)
        x_prev = x
        if plan.as_block:
            x = x + attend(blk, x, reconstruct_nested(x, stages), as_ctx, rows_now, full)
        elif plan.stage_after_attention:  # the attention's own keys, FFN on the kept rows
            if config.needs_key_metric:
                upd, metric = attend_with_keys(blk, x, ctx, rows_now)
            else:
                upd, metric = attend(blk, x, x, ctx, rows_now, rows_now), None
            x = stage_at(plan, x + upd, x, metric)
        else:
            x = x + attend(blk, x, x, ctx, rows_now, rows_now)
        x = x + blk.ffn_branch(x)
        if li in taps:
            tapped[li] = reconstruct_nested(x, stages) if config.reintegrate else x

    out = reconstruct_nested(x, stages) if config.reintegrate else x
    last = stages[-1]
    pos = last.positions
    if len(stages) == 1:
        keep_idx, rem_idx = last.keep_idx, last.rem_idx
    else:
        mask = torch.zeros(B, N, dtype=torch.bool, device=h.device).scatter(1, pos, True)
        keep_idx, rem_idx = compact(mask, pos.shape[1]), compact(~mask, N - pos.shape[1])
    plan = stage_plan(layout, config, len(stages) - 1, N)
    return DriverOutput(out, keep_idx, rem_idx, last.nbr_idx, last.nbr_w, stages[0].scores, plan, stages, tapped,
                        metric_dims)


def attend_with_keys(blk, x: torch.Tensor, ctx: AttnContext, lengths: Optional[Sequence[int]] = None):
    """Self-attention of rows ``x`` (within each segment of ``lengths``) and the head-averaged keys
    it computed: ``blk.attention_with_keys`` where the block has it, else the update plus
    ``key_features`` of the same rows."""
    fn = getattr(blk, "attention_with_keys", None)
    if fn is None:
        return attend(blk, x, x, ctx, lengths, lengths), _key_metric(blk, x, ctx.kv_pos)

    def one(xs, c):
        try:
            return fn(xs, xs, c)
        except NotImplementedError as e:
            raise ValueError("a post-attention key-metric stage needs the block's attention keys "
                             "(Block.attention_with_keys or Block.key_features); this block provides none") from e

    if lengths is None or len(lengths) == 1:
        return one(x, ctx)
    ups, keys, o = [], [], 0
    for n in lengths:
        u, k = one(x[:, o:o + n], ctx.segment(o, n, o, n))
        ups.append(u)
        keys.append(k)
        o += n
    return torch.cat(ups, dim=1), torch.cat(keys, dim=1)


def _key_metric(blk, x: torch.Tensor, pos) -> torch.Tensor:
    """The bipartite matching metric: the block's attention keys of rows ``x`` (original positions
    ``pos``, None = all rows), head-averaged."""
    msg = ("selection needing the attention keys in the eager driver needs Block.key_features (the block's "
           "attention keys, averaged over heads); this block provides none")
    fn = getattr(blk, "key_features", None)
    if fn is None:
        raise ValueError(msg)
    try:
        return fn(x) if pos is None else fn(x, pos)
    except NotImplementedError as e:
        raise ValueError(msg) from e

