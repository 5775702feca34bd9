"""Token scoring and per-segment selection.

Shapes: hidden states ``(B, N, D)``; scores ``(B, N)``; index lists ``(B, K)`` / ``(B, R)`` of
original token positions (int64), ascending within each row.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .segments import SegmentLayout, SegmentPlan, plan_segments

__all__ = ["feature_difference_score", "select_per_segment", "gather_rows", "is_tracing", "check_scores"]


def is_tracing() -> bool:
    """True under torch.export / torch.compile / FX tracing, where data-dependent checks are illegal."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or not isinstance(t.shape[-1], int)


def feature_difference_score(h_lp: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
    """Eq. (1): ``s_i = ||H_lp[i] - H_(lp-1)[i]||_2`` over the last dim.  ``(B,N,D),(B,N,D) -> (B,N)``.

    Computed in float32 whatever the input dtype (bf16 scores tie far too often).
    """
    if h_lp.shape != h_prev.shape:
        raise ValueError(f"h_lp {tuple(h_lp.shape)} and h_prev {tuple(h_prev.shape)} must have the same shape")
    return torch.linalg.vector_norm((h_lp.float() - h_prev.float()), ord=2, dim=-1)


def check_scores(scores: torch.Tensor) -> None:
    """Eager-only guard: NaN scores would make the keep set meaningless."""
    if is_tracing() or _is_fake(scores):
        return
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN (the hidden states at prune_layer or prune_layer-1 contain NaN)")


def _rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row by descending score; ties: lower index first (stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def select_per_segment(
    scores: torch.Tensor, layout: SegmentLayout, retain: float, min_keep: int = 1, plan: SegmentPlan | None = None
) -> Tuple[torch.Tensor, torch.Tensor, SegmentPlan]:
    """Keep the top ``K_i = ceil(r * n_i)`` prunable tokens of every segment.

    Args:
        scores: ``(B, N)`` importance (higher = keep).  Protected tokens' scores are ignored.
        layout: the segment layout of each row.
    Returns:
        ``keep_idx (B, K)``, ``rem_idx (B, R)`` original positions, each ascending, and the static
        :class:`SegmentPlan`.  A segment's protected tokens are always in ``keep_idx``; the kept list
        holds, per segment in order, its protected tokens then its kept prunable tokens.

    Ties are broken towards the lower token index (stable sort), so the result is deterministic.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    check_scores(scores)
    B, N = scores.shape
    if plan is None:
        plan = plan_segments(layout, N, retain, min_keep)
    device = scores.device
    keeps, rems = [], []
    segs = plan.segments
    P = layout.protected
    same_len = len(segs) > 1 and len({(s.length, s.keep) for s in segs}) == 1
    if same_len:
        # All segments alike (video frames): one batched sort over (B * S, n).
        S, n, kp = len(segs), segs[0].length, segs[0].keep
        sc = scores.reshape(B, S, n)[:, :, P:]
        order = _rank_desc(sc) + P
        starts = torch.arange(S, device=device).mul(n).view(1, S, 1)
        keep = torch.sort(order[:, :, :kp], dim=-1).values + starts
        rem = torch.sort(order[:, :, kp:], dim=-1).values + starts
        if P:
            prot = torch.arange(P, device=device).view(1, 1, P) + starts
            keep = torch.cat([prot.expand(B, S, P), keep], dim=-1)
        return keep.reshape(B, -1), rem.reshape(B, -1), plan
    for s in segs:
        sc = scores[:, s.start + P : s.start + s.length]
        order = _rank_desc(sc)
        base = s.start + P
        if P:
            keeps.append(torch.arange(s.start, s.start + P, device=device).unsqueeze(0).expand(B, P))
        keeps.append(torch.sort(order[:, : s.keep], dim=-1).values + base)
        rems.append(torch.sort(order[:, s.keep :], dim=-1).values + base)
    keep_idx = keeps[0] if len(keeps) == 1 else torch.cat(keeps, dim=1)
    rem_idx = rems[0] if len(rems) == 1 else torch.cat(rems, dim=1)
    return keep_idx, rem_idx, plan


def gather_rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``h[b, idx[b, j], :]``: ``(B, N, D), (B, K) -> (B, K, D)``."""
    return torch.gather(h, 1, idx.unsqueeze(-1).expand(*idx.shape, h.shape[-1]))
