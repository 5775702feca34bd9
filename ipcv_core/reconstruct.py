"""Neighbour search, Neighbour-Guided Reconstruction (NGR) and restore.

Shapes: removed rows ``(B, R, D)``, kept rows ``(B, K, D)``; neighbour indices ``(B, R, k)`` point
into the kept list of the same row; weights ``(B, R, k)`` sum to 1 over the last dim.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .segments import SegmentPlan
from .selection import _is_fake, is_tracing

__all__ = ["knn_kept", "neighbour_weights", "ngr", "restore", "pairwise_sq_dist", "DEFAULT_CHUNK_ELEMS"]

# A distance block holds at most this many float32 entries (64 MiB) unless a single row needs more.
DEFAULT_CHUNK_ELEMS = 1 << 24


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``(B, M, D), (B, K, D) -> (B, M, K)`` in float32 (clamped >= 0)."""
    a = a.float()
    b = b.float()
    aa = (a * a).sum(-1, keepdim=True)
    bb = (b * b).sum(-1).unsqueeze(-2)
    # aa + bb - 2ab with a plain bmm (torch-tensorrt has no baddbmm converter)
    return (aa + bb - 2.0 * torch.bmm(a, b.transpose(-1, -2))).clamp_min(0.0)


def _known_zero(n) -> bool:
    if isinstance(n, int):
        return n == 0
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(n == 0)


def _topk_smallest(d2: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    vals, idx = torch.topk(d2, k, dim=-1, largest=False, sorted=True)
    return vals, idx


def knn_kept(
    h_rem: torch.Tensor,
    h_keep: torch.Tensor,
    plan: SegmentPlan,
    k: int,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each removed row, its ``k`` nearest kept rows of the **same segment** (Euclidean).

    Protected tokens (CLS, registers) are not candidates.  A segment that keeps ``K' < k`` prunable
    tokens uses all ``K'`` of them: the distance rows are padded with ``k`` columns of ``+inf``, so
    the search always returns ``k`` entries (static shape, also under export) and the padded ones
    come back with ``valid = False`` (weight 0 in :func:`neighbour_weights`).

    Memory: distances are computed per segment, in blocks of at most ``chunk_elems`` entries (rows of
    removed tokens x that segment's kept tokens); no matrix ever spans two segments.  Under tracing
    (export/compile) each segment is one block.

    Returns:
        ``idx (B, R, k)`` int64 into the kept list, ``valid (B, R, k)`` bool.
    """
    B = h_rem.shape[0]
    idx_parts, valid_parts = [], []
    tracing = is_tracing()
    for s in plan.segments:
        if _known_zero(s.remove):  # nothing removed (e.g. retain 1.0), also for a symbolic count
            continue
        cand_lo = s.keep_offset + s.protected
        cand = h_keep[:, cand_lo : cand_lo + s.keep]
        rows = h_rem[:, s.rem_offset : s.rem_offset + s.remove]
        if tracing or not isinstance(s.remove, int) or not isinstance(s.keep, int):
            chunks = [rows]
        else:
            step = max(1, chunk_elems // max(1, s.keep + k))
            chunks = [rows[:, i : i + step] for i in range(0, s.remove, step)]
        seg_idx = []
        for c in chunks:
            d2 = pairwise_sq_dist(c, cand)
            pad = torch.full((d2.shape[0], d2.shape[1], k), float("inf"), dtype=d2.dtype, device=d2.device)
            _, ii = _topk_smallest(torch.cat([d2, pad], dim=-1), k)
            seg_idx.append(ii)
        ii = seg_idx[0] if len(seg_idx) == 1 else torch.cat(seg_idx, dim=1)
        valid = ii < s.keep
        ii = torch.where(valid, ii, torch.zeros_like(ii)) + cand_lo
        idx_parts.append(ii)
        valid_parts.append(valid)
    if not idx_parts:
        z = torch.zeros(B, 0, k, dtype=torch.long, device=h_rem.device)
        return z, z.bool()
    if len(idx_parts) == 1:
        return idx_parts[0], valid_parts[0]
    return torch.cat(idx_parts, dim=1), torch.cat(valid_parts, dim=1)


def neighbour_weights(
    h_rem: torch.Tensor,
    h_keep: torch.Tensor,
    idx: torch.Tensor,
    valid: torch.Tensor,
    weighting: str = "mean",
    temperature: float = 0.1,
) -> torch.Tensor:
    """NGR weights ``(B, R, k)`` summing to 1 over valid neighbours (float32).

    ``mean``: ``1/k_eff`` (the paper).  ``similarity``: ``softmax(cos(h_i, h_j) / temperature)``
    over the valid neighbours, cosine taken at ``l_p``.
    """
    v = valid.float()
    if weighting == "mean":
        return v / v.sum(-1, keepdim=True).clamp_min(1.0)
    if weighting != "similarity":
        raise ValueError(f"weighting must be 'mean' or 'similarity', got {weighting!r}")
    B, R, k = idx.shape
    D = h_keep.shape[-1]
    nb = torch.gather(h_keep.float(), 1, idx.reshape(B, R * k, 1).expand(B, R * k, D)).reshape(B, R, k, D)
    cos = torch.nn.functional.cosine_similarity(h_rem.float().unsqueeze(2), nb, dim=-1, eps=1e-8)
    logits = (cos / temperature).masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def ngr(
    h_rem_lp: torch.Tensor,
    h_keep_lp: torch.Tensor,
    h_keep_l: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Eq. (5): ``h~_i,l = h_i,lp + sum_j w_ij (h_j,l - h_j,lp)`` over the neighbours ``j`` of ``i``.

    ``(B,R,D), (B,K,D), (B,K,D), (B,R,k), (B,R,k) -> (B,R,D)`` in the dtype of ``h_keep_l``.
    Eagerly the weighted sum of the neighbours' deltas is one ``embedding_bag`` (a fused gather +
    weighted sum, ~15x faster than gathering column by column); traced (export, compile) it is
    recorded as one row gather (``index_select``) and multiply-add per neighbour column, which
    ONNX / TensorRT convert and inductor fuses.  Memory stays ``O(R * D)`` either way.
    """
    delta = h_keep_l - h_keep_lp
    B, R, k = idx.shape
    K, D = delta.shape[1], delta.shape[2]
    out = h_rem_lp.to(h_keep_l.dtype)
    if k == 0:
        return out
    flat = delta.reshape(B * K, D)
    rows = idx + (torch.arange(B, device=idx.device) * K).view(B, 1, 1) if B != 1 else idx
    rows = rows.reshape(B * R, k)
    w = weights.to(delta.dtype).reshape(B * R, k)
    static = all(isinstance(d, int) for d in (B, R, K, D))
    if static and not is_tracing() and not _is_fake(delta) and delta.dtype in (torch.float32, torch.float64, torch.float16,
                                                                             torch.bfloat16):
        return out + F.embedding_bag(rows, flat, mode="sum", per_sample_weights=w).view(B, R, D)
    acc = out.reshape(B * R, D)
    # addcmul fuses the multiply-add but has no symbolic-shape kernel: traced with a dynamic row count
    # (export of a batched layout) the plain ops are recorded instead
    for j in range(k):
        g = flat.index_select(0, rows[:, j])
        acc = torch.addcmul(acc, g, w[:, j:j + 1]) if static else acc + g * w[:, j:j + 1]
    return acc.view(B, R, D)


def restore(
    h_keep: torch.Tensor, h_rem: torch.Tensor, keep_idx: torch.Tensor, rem_idx: torch.Tensor
) -> torch.Tensor:
    """Eqs. (7)/(10): place kept and reconstructed rows back at their original positions.

    ``(B,K,D), (B,R,D), (B,K), (B,R) -> (B, K+R, D)``.
    """
    B, K, D = h_keep.shape
    R = h_rem.shape[1]
    out = h_keep.new_empty(B, K + R, D)
    out = out.scatter(1, keep_idx.unsqueeze(-1).expand(B, K, D), h_keep)
    out = out.scatter(1, rem_idx.unsqueeze(-1).expand(B, R, D), h_rem.to(h_keep.dtype))
    return out
