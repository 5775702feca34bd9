"""The prune step at the input of block ``l_p`` as one function, shared by the eager driver and
the graph rewrite (so both run exactly the same computation): score, select per segment, find
neighbours, NGR weights, and (variants) absorption sizes / merged values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import IPCVConfig
from .reconstruct import knn_kept, neighbour_weights
from .segments import SegmentLayout, SegmentPlan, plan_segments
from .selection import feature_difference_score, gather_rows, select_per_segment
from .variants import absorb_sizes, bipartite_scores, grid_coords, hash_of, hash_scores, merge_average, normalise_metric

__all__ = ["PruneState", "prune_tokens", "kept_layout", "stage_keep_counts", "reconstruct_nested", "layout_coords"]


@dataclass
class PruneState:
    keep_idx: torch.Tensor  # (B, K) original positions, ascending
    rem_idx: torch.Tensor  # (B, R)
    h_keep_lp: torch.Tensor  # (B, K, D) kept rows at l_p (merged values with merge="average")
    h_rem_lp: torch.Tensor  # (B, R, D)
    nbr_idx: torch.Tensor  # (B, R, k) into the kept list
    nbr_w: torch.Tensor  # (B, R, k) NGR weights (sum to 1)
    log_size: Optional[torch.Tensor]  # (B, K) log of absorbed sizes (merge variants), else None
    scores: torch.Tensor  # (B, N)
    plan: SegmentPlan


def _coords(layout: SegmentLayout, plan: SegmentPlan, B: int, device) -> torch.Tensor:
    lengths = [s.length for s in plan.segments]
    grids = layout.grids if layout.grids is not None else None
    if grids is None:
        layout.segment_grid(0)  # raises the "needs the patch grid" error
    c = grid_coords(grids, lengths, layout.protected, device, layout.merge)
    return c.unsqueeze(0).expand(B, -1, -1)


def prune_tokens(
    h: torch.Tensor,
    h_prev: torch.Tensor,
    layout: SegmentLayout,
    config: IPCVConfig,
    *,
    keep_counts=None,
    positions: Optional[torch.Tensor] = None,
    coords: Optional[torch.Tensor] = None,
    metric: Optional[torch.Tensor] = None,
    sizes: Optional[torch.Tensor] = None,
) -> PruneState:
    """``h = H_lp``, ``h_prev = H_(lp-1)``, both ``(B, N, D)``.

    Later stages of a multi-stage schedule pass ``keep_counts`` (prunable tokens to keep per
    segment), ``positions (B, N)`` (original positions of the rows, for hashed scores) and
    ``coords (B, N, 2)`` (grid coordinates of the rows, for spatial neighbours); their rows no longer
    form a grid, so stratified selections fall back to the plain top-K of their score.

    ``metric (B, N, C)``: the matching metric of ``selection="bipartite"`` (required there; with
    ``reconstruction="feature"`` the neighbour search uses it too, by cosine).  ``sizes (B, N)``:
    how many original tokens each row stands for (merge variants, later stages); None = all 1.
    """
    B, N, _ = h.shape
    plan = plan_segments(layout, N, config.retain, config.min_keep, keep_counts)
    unit = None if metric is None else normalise_metric(metric)  # cosine via unit rows, computed once
    if config.selection in ("random", "stratified_random"):
        if positions is None:
            scores = hash_scores(N, config.seed, h.device).unsqueeze(0).expand(B, N)
        else:
            scores = hash_of(positions, config.seed)
    elif config.selection == "bipartite":
        if metric is None:
            raise ValueError("selection='bipartite' needs the matching metric (the block's attention keys)")
        scores = bipartite_scores(unit, plan)
    else:
        scores = feature_difference_score(h, h_prev)
    strategy = "stratified" if config.selection.startswith("stratified") and positions is None else "topk"
    keep_idx, rem_idx, plan = select_per_segment(scores, layout, config.retain, config.min_keep, plan, strategy)
    h_keep = gather_rows(h, keep_idx)
    h_rem = gather_rows(h, rem_idx)
    if config.reconstruction == "spatial":
        c = _coords(layout, plan, B, h.device) if coords is None else coords
        nbr_idx, valid = knn_kept(gather_rows(c, rem_idx), gather_rows(c, keep_idx), plan, config.k)
    elif unit is not None:
        nbr_idx, valid = knn_kept(gather_rows(unit, rem_idx), gather_rows(unit, keep_idx), plan, config.k)
    else:
        nbr_idx, valid = knn_kept(h_rem, h_keep, plan, config.k)
    w = neighbour_weights(h_rem, h_keep, nbr_idx, valid, config.weighting, config.similarity_temperature)
    log_size = None
    if config.merge != "none":
        s_keep = None if sizes is None else gather_rows(sizes.unsqueeze(-1), keep_idx).squeeze(-1)
        s_rem = None if sizes is None else gather_rows(sizes.unsqueeze(-1), rem_idx).squeeze(-1)
        new_sizes = absorb_sizes(nbr_idx, valid, h_keep.shape[1], s_keep, s_rem)
        if config.merge == "average":
            h_keep = merge_average(h_keep, h_rem, nbr_idx, new_sizes, s_keep, s_rem)
        log_size = torch.log(new_sizes)
    return PruneState(keep_idx, rem_idx, h_keep, h_rem, nbr_idx, w, log_size, scores, plan)


def kept_layout(layout: SegmentLayout, plan: SegmentPlan) -> SegmentLayout:
    """The layout of a kept list (protected + kept rows per segment; no grid any more)."""
    if layout.lengths is None:
        return SegmentLayout(None, layout.protected)
    return SegmentLayout(tuple(s.protected + s.keep for s in plan.segments), layout.protected)


def stage_keep_counts(layout: SegmentLayout, n_tokens, retain: float, min_keep: int):
    """Prunable tokens kept per segment at a stage with ``retain`` (of the ORIGINAL counts)."""
    return [s.keep for s in plan_segments(layout, n_tokens, retain, min_keep).segments]


def layout_coords(layout: SegmentLayout, n_tokens, B: int, device) -> torch.Tensor:
    """``(B, N, 2)`` grid coordinates of every token of the original layout."""
    return _coords(layout, plan_segments(layout, n_tokens, 1.0), B, device)


def reconstruct_nested(x_keep: torch.Tensor, stages) -> torch.Tensor:
    """NGR + restore through every stage, innermost (last) first: kept rows of the last stage ->
    the full original sequence."""
    from .reconstruct import ngr, restore

    x = x_keep
    for st in reversed(list(stages)):
        x = restore(x, ngr(st.h_rem_lp, st.h_keep_lp, x, st.nbr_idx, st.nbr_w), st.keep_idx, st.rem_idx)
    return x
