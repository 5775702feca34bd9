"""One prune stage as one function, :func:`prune_stage`, shared by the eager driver and the graph
rewrite's ``ipcv::prune`` op (so both run exactly the same computation): derive the current rows'
layout from the schedule, score them (the config's selection rule), select per segment, find
neighbours (the reconstruction rule), NGR weights, and (merge rules) absorption sizes and merged
values.  :func:`reconstruct_nested` is the matching way back: NGR + restore through every stage.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .config import IPCVConfig
from .reconstruct import knn_kept, neighbour_weights, ngr, restore
from .rules import ScoreInputs
from .segments import SegmentLayout, SegmentPlan, plan_segments
from .selection import select_per_segment
from .variants import absorb_sizes, grid_coords, merge_average, merge_mlerp, normalise_metric

__all__ = ["PruneOutputs", "prune_stage", "stage_plan", "stage_layout", "kept_lengths", "reconstruct_nested", "layout_coords"]


class PruneOutputs(NamedTuple):
    """What one prune stage produces (the tensors of the ``ipcv::prune`` op, in this order).

    Indices ``keep_idx`` / ``rem_idx`` / ``nbr_idx`` refer to the stage's incoming rows (the kept
    list for ``nbr_idx``); ``positions`` are the kept rows' ORIGINAL positions."""

    x_keep: torch.Tensor  # (B, K, D) kept rows at the stage (merged values with merge="average")
    x_rem: torch.Tensor  # (B, R, D) removed rows at the stage
    keep_idx: torch.Tensor  # (B, K) ascending
    rem_idx: torch.Tensor  # (B, R) ascending
    nbr_idx: torch.Tensor  # (B, R, k) into the kept list
    nbr_w: torch.Tensor  # (B, R, k) NGR weights (sum to 1 over valid neighbours)
    log_size: torch.Tensor  # (B, K) log of the rows' sizes (zeros unless the merge rule tracks sizes)
    positions: torch.Tensor  # (B, K) original positions of the kept rows
    scores: torch.Tensor  # (B, L) the selection scores of the incoming rows


def gather_rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``h[b, idx[b, j], :]``: ``(B, L, D), (B, K) -> (B, K, D)`` as one row ``index_select`` of the
    flattened rows (the same values as :func:`ipcv_core.selection.gather_rows`' ``torch.gather``,
    ~2.5x faster on CPU for wide rows; ONNX ``Gather``, TensorRT ``index_select``)."""
    B, L = h.shape[0], h.shape[1]
    flat = idx + (torch.arange(B, device=idx.device) * L).unsqueeze(1)
    return h.reshape(-1, h.shape[-1]).index_select(0, flat.reshape(-1)).view(idx.shape[0], idx.shape[1], h.shape[-1])


def layout_coords(layout: SegmentLayout, n_tokens, B: int, device) -> torch.Tensor:
    """``(B, N, 2)`` grid coordinates of every token of the original layout."""
    plan = plan_segments(layout, n_tokens, 1.0)
    layout.segment_grid(0)  # raises the "needs the patch grid" error when there is none
    c = grid_coords(layout.grids, [s.length for s in plan.segments], layout.protected, device, layout.merge)
    return c.unsqueeze(0).expand(B, -1, -1)


def _segment_positions(layout: SegmentLayout, n_tokens, positions: torch.Tensor) -> torch.Tensor:
    """``positions`` (original) relative to the start of their original segment: per image / frame,
    wherever it sits in a packed row (static segment starts; no bucketize, for ONNX / TensorRT)."""
    if layout.lengths is None or len(layout.lengths) == 1:
        return positions
    starts = [s.start for s in plan_segments(layout, n_tokens, 1.0).segments]
    bounds = torch.tensor(starts[1:], dtype=positions.dtype, device=positions.device)
    seg = (positions.unsqueeze(-1) >= bounds).sum(-1)
    return positions - torch.tensor(starts, dtype=positions.dtype, device=positions.device)[seg]


def _retains(config: IPCVConfig, stage: int):
    sched = config.schedule
    if not 0 <= stage < len(sched):
        raise ValueError(f"stage must be in [0, {len(sched) - 1}] for this schedule, got {stage}")
    return sched[stage][1], (sched[stage - 1][1] if stage else 1.0)


def stage_layout(layout: SegmentLayout, config: IPCVConfig, stage: int, n_tokens) -> SegmentLayout:
    """The layout of the rows entering ``stage``: the original layout at stage 0; afterwards the
    protected + kept rows of each segment at the previous stage (no grid any more)."""
    if stage == 0:
        return layout
    _, prev = _retains(config, stage)
    if layout.lengths is None:
        return SegmentLayout(None, layout.protected)
    before = plan_segments(layout, n_tokens, prev, config.min_keep)
    return SegmentLayout(tuple(s.protected + s.keep for s in before.segments), layout.protected)


def stage_plan(layout: SegmentLayout, config: IPCVConfig, stage: int, n_tokens) -> SegmentPlan:
    """The static plan of ``stage`` over its incoming rows.  Every ratio is relative to the ORIGINAL
    token counts: stage ``s`` keeps ``num_keep(n, retain_s)`` of each original segment of ``n``."""
    retain, prev = _retains(config, stage)
    if stage == 0:
        return plan_segments(layout, n_tokens, retain, config.min_keep)
    before = plan_segments(layout, n_tokens, prev, config.min_keep)
    counts = [s.keep for s in plan_segments(layout, n_tokens, retain, config.min_keep).segments]
    return plan_segments(stage_layout(layout, config, stage, n_tokens), before.n_keep, retain, config.min_keep, counts)


def kept_lengths(layout: SegmentLayout, config: IPCVConfig, stage: int, n_tokens) -> Optional[tuple]:
    """Per-segment rows (protected included) that ``stage`` keeps of a packed layout; None for the
    batched layout (one segment per row)."""
    if layout.lengths is None:
        return None
    return tuple(s.protected + s.keep for s in stage_plan(layout, config, stage, n_tokens).segments)


def prune_stage(
    h: torch.Tensor,
    h_prev: torch.Tensor,
    x0: torch.Tensor,
    layout: SegmentLayout,
    config: IPCVConfig,
    stage: int,
    *,
    positions: Optional[torch.Tensor] = None,
    metric: Optional[torch.Tensor] = None,
    log_size: Optional[torch.Tensor] = None,
) -> PruneOutputs:
    """Stage ``stage`` of ``config.schedule`` at the input of its block (``placement="block_input"``)
    or after its attention's residual add (``"post_attention"``).

    Args:
        h, h_prev: ``(B, L, D)`` the rows entering the stage's block and the previous block (for
            eq. 1) — with ``placement="post_attention"`` the rows after the attention residual add and
            the block input; at stage 0 ``L = N``, the original token count.
        x0: ``(B, N, D)`` the block stack's input (its token count is the original one).
        layout: the ORIGINAL segment layout.
        positions: ``(B, L)`` original positions of the incoming rows (None at stage 0).
        metric: ``(B, L, C)`` the block's attention keys of the incoming rows, head-averaged
            (selection rules with ``needs_key_metric``; with ``reconstruction="feature"`` neighbours
            are then searched by cosine of the same keys).
        log_size: ``(B, L)`` log sizes of the incoming rows from the previous stage (merge rules).
    """
    B, L, _ = h.shape
    N = x0.shape[1]
    first = stage == 0
    if first and positions is not None:
        raise ValueError("prune_stage: stage 0 takes no positions (the rows are the original ones)")
    if not first and positions is None:
        raise ValueError(f"prune_stage: stage {stage} needs the incoming rows' original positions")
    sel = config.selection_rule.at_stage(stage)
    cur = stage_layout(layout, config, stage, N)
    plan = stage_plan(layout, config, stage, N)
    pos_in = positions if positions is not None else torch.arange(L, device=h.device).unsqueeze(0).expand(B, L)
    unit = None if metric is None else normalise_metric(metric)  # cosine via unit rows, computed once
    if sel.needs_key_metric and unit is None:
        raise ValueError(f"selection={config.selection!r} needs the matching metric (the block's attention keys)")
    scores = sel.score(ScoreInputs(h, h_prev, pos_in, unit, x0, plan, config.seed,
                                   _segment_positions(layout, N, pos_in), metric))
    strategy = "stratified" if (sel.grouped and first) else "topk"
    retain, _ = _retains(config, stage)
    keep_idx, rem_idx, plan = select_per_segment(scores, cur, retain, config.min_keep, plan, strategy)
    h_keep, h_rem = gather_rows(h, keep_idx), gather_rows(h, rem_idx)
    if config.reconstruction_rule.needs_grid:
        c = layout_coords(layout, N, B, h.device)
        c = c if first else gather_rows(c, positions)
        nbr_idx, valid = knn_kept(gather_rows(c, rem_idx), gather_rows(c, keep_idx), plan, config.k)
    elif unit is not None:
        nbr_idx, valid = knn_kept(gather_rows(unit, rem_idx), gather_rows(unit, keep_idx), plan, config.k)
    else:
        nbr_idx, valid = knn_kept(h_rem, h_keep, plan, config.k)
    w = neighbour_weights(h_rem, h_keep, nbr_idx, valid, config.weighting, config.similarity_temperature)
    merge = config.merge_rule
    if merge.tracks_sizes:
        sizes = None if log_size is None else torch.exp(log_size)
        s_keep = None if sizes is None else gather_rows(sizes.unsqueeze(-1), keep_idx).squeeze(-1)
        s_rem = None if sizes is None else gather_rows(sizes.unsqueeze(-1), rem_idx).squeeze(-1)
        if merge.drops_at(config.schedule[stage][0], config.prune_layer):  # removed rows dropped: nothing absorbed
            new_sizes = torch.ones(keep_idx.shape, device=h.device) if s_keep is None else s_keep.float()
        else:
            new_sizes = absorb_sizes(nbr_idx, valid, h_keep.shape[1], s_keep, s_rem)
            if merge.averages and merge.norm_preserving:
                h_keep = merge_mlerp(h_keep, h_rem, nbr_idx, valid, new_sizes, s_keep, s_rem)
            elif merge.averages:
                h_keep = merge_average(h_keep, h_rem, nbr_idx, new_sizes, s_keep, s_rem)
        out_log_size = torch.log(new_sizes)
    else:
        out_log_size = torch.zeros(keep_idx.shape, dtype=torch.float32, device=h.device)
    if config.reconstruction_rule.copies_neighbour:
        # ToMe's unmerge as NGR with one neighbour: a removed row's value at the stage becomes its first
        # neighbour's (merged) value, so NGR restores it as that row's final value
        h_rem = gather_rows(h_keep, nbr_idx[:, :, 0])
        w = torch.cat([torch.ones_like(w[:, :, :1]), torch.zeros_like(w[:, :, 1:])], dim=-1)
    pos = keep_idx if first else torch.gather(positions, 1, keep_idx)
    return PruneOutputs(h_keep, h_rem, keep_idx, rem_idx, nbr_idx, w, out_log_size, pos, scores)


def reconstruct_nested(x_keep: torch.Tensor, stages: Sequence[PruneOutputs]) -> torch.Tensor:
    """NGR + restore through every stage, innermost (last) first: the kept rows of the last stage
    at the current layer -> the full original sequence (eqs. 5, 7/10)."""
    x = x_keep
    for st in reversed(list(stages)):
        x = restore(x, ngr(st.x_rem, st.x_keep, x, st.nbr_idx, st.nbr_w), st.keep_idx, st.rem_idx)
    return x
