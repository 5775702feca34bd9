"""Token scoring and per-segment selection.

Shapes: hidden states ``(B, N, D)``; scores ``(B, N)``; index lists ``(B, K)`` / ``(B, R)`` of
original token positions (int64), ascending within each row.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .segments import SegmentLayout, SegmentPlan, plan_segments

__all__ = ["feature_difference_score", "select_per_segment", "compact", "gather_rows", "is_tracing", "dart_keep_mask",
           "dart_segment_scores", "DART_PIVOTS"]

#: DART(ViT)'s pivots per image (segment)
DART_PIVOTS = 8


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


def compact(mask: torch.Tensor, count) -> torch.Tensor:
    """Positions of the True entries of each row of ``mask (B, n)``, ascending, as ``(B, count)``;
    every row must hold exactly ``count`` True entries.

    Sort-free and shape-static (cumsum + scatter into a spare slot), so it exports to ONNX
    (CumSum, ScatterElements) and to TensorRT, whose TopK/sort cannot take a full token list.
    """
    B, n = mask.shape
    pos = torch.cumsum(mask.to(torch.long), dim=1) - 1
    dst = torch.where(mask, pos, torch.full_like(pos, count))  # unselected -> spare slot `count`
    src = torch.arange(n, device=mask.device).unsqueeze(0).expand(B, n)
    out = torch.zeros(B, count + 1, dtype=torch.long, device=mask.device).scatter(1, dst, src)
    return out[:, :count]


def _split_top(scores: torch.Tensor, keep) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``keep`` of each row -> (kept positions, removed positions), each ascending."""
    n = scores.shape[-1]
    top = torch.topk(scores, keep, dim=-1, largest=True, sorted=False).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, top, True)
    flat = mask.reshape(-1, n)
    keep_pos = compact(flat, keep).reshape(*scores.shape[:-1], keep)
    rem_pos = compact(~flat, n - keep).reshape(*scores.shape[:-1], n - keep)
    return keep_pos, rem_pos


def select_per_segment(
    scores: torch.Tensor,
    layout: SegmentLayout,
    retain: float,
    min_keep: int = 1,
    plan: SegmentPlan | None = None,
    strategy: str = "topk",
) -> Tuple[torch.Tensor, torch.Tensor, SegmentPlan]:
    """Keep the top ``K_i = ceil(r * n_i)`` prunable tokens of every segment.

    Args:
        scores: ``(B, N)`` importance (higher = keep).  Protected tokens' scores are ignored.
        layout: the segment layout of each row.
    Returns:
        ``keep_idx (B, K)``, ``rem_idx (B, R)`` original positions, each ascending, and the static
        :class:`SegmentPlan`.  A segment's protected tokens are always in ``keep_idx``; the kept list
        holds, per segment in order, its protected tokens then its kept prunable tokens.

    ``strategy="stratified"``: one kept token per spatially compact group of the segment's patch
    grid (:func:`ipcv_core.variants.stratified_top`; needs ``layout.grids``) instead of the global
    top-K.

    Rows with NaN / inf scores still get a valid keep set (``K`` distinct positions; which ones is
    the backend's TopK's business); nothing in one row depends on another.

    Selection is ``topk`` (exportable; static K), so exact ties among scores are resolved by the
    backend's TopK: deterministic for a given backend and input (PyTorch CPU and ONNX Runtime may
    pick different members of a tie).  The order of the kept list never depends on ties: it is
    ascending original position (a sort-free compaction, see :func:`compact`).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    # Non-finite scores (an image with NaN / inf values) are not an error: TopK still returns K
    # distinct positions of that row, so the keep set is valid, that image's output is NaN and no
    # other row is touched — the same rule on every backend (a compiled graph cannot raise on data).
    B, N = scores.shape
    if plan is None:
        plan = plan_segments(layout, N, retain, min_keep)
    device = scores.device
    keeps, rems = [], []
    segs = plan.segments
    P = layout.protected
    if strategy not in ("topk", "stratified"):
        raise ValueError(f"strategy must be 'topk' or 'stratified', got {strategy!r}")
    if strategy == "stratified":
        from .variants import stratified_top

        for i, s in enumerate(segs):
            base = s.start + P
            sc = scores[:, base : s.start + s.length]
            top = stratified_top(sc, layout.segment_grid(i), s.keep, layout.merge)
            n = s.length - P
            mask = torch.zeros(B, n, dtype=torch.bool, device=device).scatter(1, top, True)
            if P:
                keeps.append(torch.arange(s.start, base, device=device).unsqueeze(0).expand(B, P))
            keeps.append(compact(mask, s.keep) + base)
            rems.append(compact(~mask, n - s.keep) + base)
        keep_idx = keeps[0] if len(keeps) == 1 else torch.cat(keeps, dim=1)
        rem_idx = rems[0] if len(rems) == 1 else torch.cat(rems, dim=1)
        return keep_idx, rem_idx, plan
    same_len = len(segs) > 1 and len({(s.length, s.keep) for s in segs}) == 1
    if same_len:
        # All segments alike (video frames): one batched selection over (B, S, n).
        S, n, kp = len(segs), segs[0].length, segs[0].keep
        keep, rem = _split_top(scores.reshape(B, S, n)[:, :, P:], kp)
        starts = torch.arange(S, device=device).mul(n).view(1, S, 1)
        keep = keep + starts + P
        rem = rem + starts + P
        if P:
            prot = torch.arange(P, device=device).view(1, 1, P) + starts
            keep = torch.cat([prot.expand(B, S, P), keep], dim=-1)
        return keep.reshape(B, -1), rem.reshape(B, -1), plan
    for s in segs:
        base = s.start + P
        kpos, rpos = _split_top(scores[:, base : s.start + s.length], s.keep)
        if P:
            keeps.append(torch.arange(s.start, base, device=device).unsqueeze(0).expand(B, P))
        keeps.append(kpos + base)
        rems.append(rpos + base)
    keep_idx = keeps[0] if len(keeps) == 1 else torch.cat(keeps, dim=1)
    rem_idx = rems[0] if len(rems) == 1 else torch.cat(rems, dim=1)
    return keep_idx, rem_idx, plan


def gather_rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``h[b, idx[b, j], :]``: ``(B, N, D), (B, K) -> (B, K, D)``."""
    return torch.gather(h, 1, idx.unsqueeze(-1).expand(*idx.shape, h.shape[-1]))


# ----------------------------------------------------------------------------- DART(ViT)
def dart_keep_mask(h: torch.Tensor, keys: torch.Tensor, keep, num_pivots: int = DART_PIVOTS) -> torch.Tensor:
    """DART's duplication-aware keep set over the prunable tokens of each row (Wen et al., *Stop Looking for
    Important Tokens in Multimodal Language Models: Duplication Matters More*, 2025, arXiv 2502.11494, applied
    at a ViT layer as in the IPCV paper).

    Pivots: the ``min(num_pivots, keep)`` tokens whose attention keys have the largest L1 norm.  Then, pivot by
    pivot, the not-yet-kept tokens *least* cosine-similar (on ``h``) to that pivot are kept, the budget
    ``keep - #pivots`` split evenly over the pivots (earlier pivots get the remainder), so exactly ``keep``
    tokens are kept.

    Args:
        h: ``(B, n, D)`` hidden states of the prunable tokens (cosine similarity).
        keys: ``(B, n, C)`` their attention keys, head-averaged (pivot choice by L1 norm).
        keep: tokens kept per row, ``1 <= keep <= n``.
    Returns:
        ``(B, n)`` bool with exactly ``keep`` True per row; the pivots are always kept.
    """
    B, n, _ = h.shape
    if isinstance(keep, int) and isinstance(n, int) and not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    p = max(1, min(num_pivots, keep))
    knorm = keys.float().abs().sum(-1)
    pivots = torch.topk(knorm, p, dim=-1, sorted=True).indices  # (B, p)
    hn = torch.nn.functional.normalize(h.float(), dim=-1)
    piv = torch.gather(hn, 1, pivots.unsqueeze(-1).expand(B, p, hn.shape[-1]))
    sim = piv @ hn.transpose(1, 2)  # (B, p, n) cosine
    kept = torch.zeros(B, n, dtype=torch.bool, device=h.device).scatter(1, pivots, True)
    budget = keep - p
    for i in range(p):
        take = (budget + (p - i) - 1) // (p - i)  # ceil of an even split of what is left
        budget -= take
        if take == 0:
            continue
        s = (-sim[:, i]).masked_fill(kept, float("-inf"))
        idx = torch.topk(s, take, dim=-1).indices
        kept = kept.scatter(1, idx, True)
    return kept


def dart_segment_scores(h: torch.Tensor, keys: torch.Tensor, plan: SegmentPlan,
                        num_pivots: int = DART_PIVOTS) -> torch.Tensor:
    """``(B, L)`` float32 keep scores whose top ``keep`` prunable rows of every segment of ``plan`` are DART's keep
    set of that segment (:func:`dart_keep_mask`): 1 kept, 0 not; protected rows 1 (kept anyway).  ``h (B, L, D)``
    the rows, ``keys (B, L, C)`` their head-averaged attention keys (raw, not unit-normalised)."""
    B = h.shape[0]
    parts = []
    for s in plan.segments:
        lo, hi = s.start + s.protected, s.start + s.length
        if s.protected:
            parts.append(torch.ones(B, s.protected, device=h.device))
        if s.keep == 0:
            parts.append(torch.zeros(B, hi - lo, device=h.device))
        else:
            parts.append(dart_keep_mask(h[:, lo:hi], keys[:, lo:hi], s.keep, num_pivots).float())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
