"""Restoring removed tokens without reconstruction: copy the final value of the nearest kept token.

Used by the naive-prune ablation ("copy neighbour value", Euclidean nearest at ``H_lp`` — the same
metric as IPCV's NGR neighbours, so it differs from NGR with ``k = 1`` only by not adding the removed
token's own ``l_p`` value minus its neighbour's) and by DART(ViT) (cosine nearest at ``H_lp``, DART's
own similarity).  Protected tokens are never candidates.  All per row (image).
"""

from __future__ import annotations

import torch

from ipcv_core.reconstruct import pairwise_sq_dist, restore
from ipcv_core.selection import gather_rows

__all__ = ["nearest_kept", "copy_nearest"]


def nearest_kept(h_rem: torch.Tensor, h_keep: torch.Tensor, protected: int = 0, metric: str = "euclidean") -> torch.Tensor:
    """For each removed row ``(B, R, D)``, the index into the kept list ``(B, K, D)`` of its nearest
    kept, non-protected row: ``(B, R)`` int64.  ``metric``: ``euclidean`` or ``cosine``."""
    cand = h_keep[:, protected:].float()
    if cand.shape[1] == 0:
        raise ValueError("no kept prunable token to copy from")
    if metric == "euclidean":
        idx = pairwise_sq_dist(h_rem.float(), cand).argmin(dim=-1)
    elif metric == "cosine":
        a = torch.nn.functional.normalize(h_rem.float(), dim=-1)
        b = torch.nn.functional.normalize(cand, dim=-1)
        idx = (a @ b.transpose(1, 2)).argmax(dim=-1)
    else:
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    return idx + protected


def copy_nearest(x_keep: torch.Tensor, nbr: torch.Tensor, keep_idx: torch.Tensor, rem_idx: torch.Tensor) -> torch.Tensor:
    """Full-length ``(B, N, D)``: kept rows in place, each removed row a copy of kept row ``nbr``."""
    return restore(x_keep, gather_rows(x_keep, nbr), keep_idx, rem_idx)
