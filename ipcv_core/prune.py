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
from .variants import absorb_sizes, grid_coords, hash_scores, merge_average

__all__ = ["PruneState", "prune_tokens"]


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
    c = grid_coords(grids, lengths, layout.protected, device)
    return c.unsqueeze(0).expand(B, -1, -1)


def prune_tokens(h: torch.Tensor, h_prev: torch.Tensor, layout: SegmentLayout, config: IPCVConfig) -> PruneState:
    """``h = H_lp``, ``h_prev = H_(lp-1)``, both ``(B, N, D)``."""
    B, N, _ = h.shape
    plan = plan_segments(layout, N, config.retain, config.min_keep)
    if config.selection in ("random", "stratified_random"):
        scores = hash_scores(N, config.seed, h.device).unsqueeze(0).expand(B, N)
    else:
        scores = feature_difference_score(h, h_prev)
    strategy = "stratified" if config.selection.startswith("stratified") else "topk"
    keep_idx, rem_idx, plan = select_per_segment(scores, layout, config.retain, config.min_keep, plan, strategy)
    h_keep = gather_rows(h, keep_idx)
    h_rem = gather_rows(h, rem_idx)
    if config.reconstruction == "spatial":
        c = _coords(layout, plan, B, h.device)
        nbr_idx, valid = knn_kept(gather_rows(c, rem_idx), gather_rows(c, keep_idx), plan, config.k)
    else:
        nbr_idx, valid = knn_kept(h_rem, h_keep, plan, config.k)
    w = neighbour_weights(h_rem, h_keep, nbr_idx, valid, config.weighting, config.similarity_temperature)
    log_size = None
    if config.merge != "none":
        sizes = absorb_sizes(nbr_idx, valid, h_keep.shape[1])
        if config.merge == "average":
            h_keep = merge_average(h_keep, h_rem, nbr_idx, sizes)
        log_size = torch.log(sizes)
    return PruneState(keep_idx, rem_idx, h_keep, h_rem, nbr_idx, w, log_size, scores, plan)
