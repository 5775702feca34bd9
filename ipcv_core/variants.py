"""Building blocks of the variants beyond the paper (see :class:`ipcv_core.IPCVConfig`):
deterministic hashed random scores, spatially stratified groups, grid coordinates and
size-weighted absorption of removed tokens.  All static-shape and export-friendly.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import torch

__all__ = ["token_rc", "hash_scores", "hash_of", "zorder_groups", "stratified_top", "grid_coords", "absorb_sizes",
           "merge_average", "merge_mlerp", "bipartite_scores", "normalise_metric", "bipartite_redundancy", "budget_bucket"]

_M = 2**31


def hash_scores(n, seed: int, device=None) -> torch.Tensor:
    """``(n,)`` pseudo-random scores in ``[0, 1)`` from the token index alone (rounds of an integer
    LCG: exact on every backend, so eager, ONNX and TensorRT pick the same tokens).  The same for
    every image, independent of batch position."""
    return hash_of(torch.arange(n, device=device, dtype=torch.long), seed)


def hash_of(i: torch.Tensor, seed: int) -> torch.Tensor:
    """:func:`hash_scores` of arbitrary int64 token positions ``i`` (any shape)."""
    x = (i * 1103515245 + 12345 + seed * 2654435) % _M
    x = (x * 1103515245 + 12345) % _M
    x = (x * 69069 + 1) % _M
    return x.to(torch.float32) / float(_M)


def _morton(r: int, c: int) -> int:
    code = 0
    for b in range(16):
        code |= ((r >> b) & 1) << (2 * b + 1) | ((c >> b) & 1) << (2 * b)
    return code


@lru_cache(maxsize=256)
def token_rc(h: int, w: int, merge: int = 1) -> Tuple[Tuple[int, int], ...]:
    """(row, col) of every token of an ``h x w`` patch grid in the model's token order: row-major
    (``merge=1``), or ``merge x merge`` windows row-major with patches row-major inside (Qwen2-VL)."""
    if merge == 1:
        return tuple((t // w, t % w) for t in range(h * w))
    out = []
    for br in range(h // merge):
        for bc in range(w // merge):
            for i in range(merge):
                for j in range(merge):
                    out.append((br * merge + i, bc * merge + j))
    return tuple(out)


@lru_cache(maxsize=256)
def _groups_list(h: int, w: int, k: int, merge: int = 1) -> Tuple[Tuple[int, ...], ...]:
    rc = token_rc(h, w, merge)
    order = sorted(range(h * w), key=lambda t: _morton(*rc[t]))
    n = h * w
    groups = []
    for g in range(k):
        lo, hi = (g * n) // k, ((g + 1) * n) // k
        groups.append(tuple(order[lo:hi]))
    return tuple(groups)


def zorder_groups(h: int, w: int, k: int, device=None, merge: int = 1) -> torch.Tensor:
    """``(k, G)`` member token indices (in the model's token order, see :func:`token_rc`) of ``k``
    spatially compact groups: the grid in Z-order (Morton) cut into ``k`` runs of
    ``floor``/``ceil(h*w/k)`` cells.  Short groups are padded with ``h*w`` (a sentinel column)."""
    if not (1 <= k <= h * w):
        raise ValueError(f"stratified selection needs 1 <= K <= h*w, got K={k} for a {h}x{w} grid")
    groups = _groups_list(h, w, k, merge)
    G = max(len(g) for g in groups)
    rows = [list(g) + [h * w] * (G - len(g)) for g in groups]
    return torch.tensor(rows, dtype=torch.long, device=device)


def stratified_top(scores: torch.Tensor, grid: Tuple[int, int], k: int, merge: int = 1) -> torch.Tensor:
    """One token per Z-order group, the best-scoring one: ``(B, n) -> (B, k)`` positions (group
    order, not sorted).  ``n == h*w``."""
    h, w = grid
    B = scores.shape[0]
    members = zorder_groups(h, w, k, scores.device, merge)  # (k, G)
    ext = torch.cat([scores, torch.full((B, 1), float("-inf"), dtype=scores.dtype, device=scores.device)], dim=1)
    g = ext[:, members.reshape(-1)].reshape(B, *members.shape)  # (B, k, G)
    best = torch.argmax(g, dim=-1, keepdim=True)  # (B, k, 1)
    return torch.gather(members.unsqueeze(0).expand(B, -1, -1), 2, best).squeeze(-1)


def grid_coords(grids, lengths, protected: int, device=None, merge: int = 1) -> torch.Tensor:
    """``(N, 2)`` float (row, col) of every token of a row; protected tokens get (-1, -1)."""
    rows = []
    for (h, w), n in zip(grids, lengths):
        rows += [(-1.0, -1.0)] * protected
        rows += [(float(r), float(c)) for r, c in token_rc(h, w, merge)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def absorb_sizes(nbr_idx: torch.Tensor, valid: torch.Tensor, n_keep, size_keep=None, size_rem=None) -> torch.Tensor:
    """Size of every kept row once each removed row is absorbed by its first neighbour:
    ``(B, R, k), (B, R, k), K -> (B, K)`` float32.  ``size_keep (B, K)`` / ``size_rem (B, R)``:
    the rows' own sizes (earlier merge stages); None = every row of size 1."""
    B = nbr_idx.shape[0]
    first = nbr_idx[:, :, 0]
    add = valid[:, :, 0].to(torch.float32)
    if size_rem is not None:
        add = add * size_rem.to(torch.float32)
    if size_keep is None:
        sizes = torch.ones(B, n_keep, dtype=torch.float32, device=nbr_idx.device)
    else:
        sizes = size_keep.to(torch.float32)
    return sizes.scatter_add(1, first, add)


def merge_average(h_keep: torch.Tensor, h_rem: torch.Tensor, nbr_idx: torch.Tensor, sizes: torch.Tensor,
                  size_keep=None, size_rem=None) -> torch.Tensor:
    """Kept rows replaced by the size-weighted mean of themselves and the removed rows they
    absorbed (ToMe's merge): ``sum(s_i h_i) / sum(s_i)`` with ``sizes`` from :func:`absorb_sizes`
    and the rows' own sizes ``size_keep`` / ``size_rem`` (None = 1)."""
    B, K, D = h_keep.shape
    first = nbr_idx[:, :, 0:1].expand(-1, -1, D)
    hk, hr = h_keep.float(), h_rem.float()
    if size_keep is not None:
        hk = hk * size_keep.to(torch.float32).unsqueeze(-1)
    if size_rem is not None:
        hr = hr * size_rem.to(torch.float32).unsqueeze(-1)
    acc = hk.scatter_add(1, first, hr)
    return (acc / sizes.unsqueeze(-1)).to(h_keep.dtype)


def merge_mlerp(h_keep: torch.Tensor, h_rem: torch.Tensor, nbr_idx: torch.Tensor, valid: torch.Tensor,
                sizes: torch.Tensor, size_keep=None, size_rem=None) -> torch.Tensor:
    """ToFu's norm-preserving merge (MLERP): a kept row that absorbs removed rows (each by its first
    valid neighbour) takes the direction of the group's size-weighted mean (:func:`merge_average`)
    and the largest L2 norm in the group (itself and what it absorbed); a kept row absorbing nothing
    is returned unchanged.  Shapes as :func:`merge_average`; ``valid (B, R, k)``."""
    B, K, D = h_keep.shape
    avg = merge_average(h_keep, h_rem, nbr_idx, sizes, size_keep, size_rem).float()
    first = nbr_idx[:, :, 0]
    ok = valid[:, :, 0]
    rem_norm = torch.linalg.vector_norm(h_rem.float(), dim=-1).masked_fill(~ok, 0.0)
    max_norm = torch.linalg.vector_norm(h_keep.float(), dim=-1).scatter_reduce(1, first, rem_norm, "amax")
    received = torch.zeros(B, K, device=h_keep.device).scatter_add(1, first, ok.float()) > 0
    out = avg / torch.linalg.vector_norm(avg, dim=-1, keepdim=True).clamp_min(1e-12) * max_norm.unsqueeze(-1)
    return torch.where(received.unsqueeze(-1), out, h_keep.float()).to(h_keep.dtype)


def normalise_metric(metric: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32 (Euclidean distance on them orders like cosine)."""
    m = metric.float()
    return m / torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min(1e-12)


_B_SCORE = 1.0e4  # set-B rows: above any cosine, so a top-K with K >= |B| keeps every one of them


def bipartite_scores(unit: torch.Tensor, plan) -> torch.Tensor:
    """ToMe's bipartite soft matching as a keep score, per segment: the segment's prunable rows
    alternate between set A (even offsets) and set B (odd); an A row scores minus its highest
    cosine similarity to any B row of its segment (the most redundant A rows score lowest and are
    removed first), a B row scores ``1e4`` (always kept while a stage keeps at least ``|B|`` rows,
    which :class:`IPCVConfig` guarantees).  Protected rows score ``1e4`` (they are kept anyway).

    ``unit (B, L, C)``: the metric (e.g. head-averaged attention keys) with unit rows
    (:func:`normalise_metric`); ``plan`` the current rows' segment plan.  Returns ``(B, L)``
    float32.  One ``(⌈L_s/2⌉ x ⌊L_s/2⌋)`` similarity block per segment (set A against set B).
    """
    m = unit
    B = m.shape[0]
    parts = []
    for s in plan.segments:
        lo = s.start + s.protected
        seg = m[:, lo : s.start + s.length]
        n = seg.shape[1]
        a, b = seg[:, 0::2], seg[:, 1::2]
        if isinstance(n, int) and n < 2:  # no B row: nothing to match (the row is kept or removed alone)
            best = torch.full((B, a.shape[1]), -2.0, device=m.device)
        else:
            best = torch.bmm(a, b.transpose(1, 2)).amax(dim=-1)  # (B, |A|): only A rows against B
        # back in the segment's order: A rows at even offsets, B rows (1e4) at odd ones
        score = torch.slice_scatter(torch.full((B, n), _B_SCORE, device=m.device), -best, dim=1, start=0, step=2)
        if s.protected:
            parts.append(torch.full((B, s.protected), _B_SCORE, device=m.device))
        parts.append(score)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def bipartite_redundancy(unit: torch.Tensor, protected: int = 0) -> torch.Tensor:
    """A training-free redundancy measure per image (batch row): the bipartite similarity mass —
    the mean over set-A rows (even offsets after the ``protected`` ones) of their highest cosine
    similarity to a set-B row, i.e. the average score ToMe's matching would merge on.  ``unit (B,
    L, C)``: unit-norm metric rows (:func:`normalise_metric` of e.g. block 0's head-averaged keys).
    Returns ``(B,)`` float32 in ``[-1, 1]``; higher = more redundant (a sky-heavy photo), lower =
    less (a document page).  One ``(L/2 x L/2)`` similarity block per image."""
    m = unit[:, protected:]
    a, b = m[:, 0::2], m[:, 1::2]
    return torch.bmm(a, b.transpose(1, 2)).amax(dim=-1).mean(dim=1)


def budget_bucket(redundancy: torch.Tensor, thresholds) -> torch.Tensor:
    """The budget bucket of each image from its :func:`bipartite_redundancy`: ``0`` for the most
    redundant (redundancy above ``thresholds[0]``), then ``1``, ..., ``len(thresholds)`` for the
    least (``thresholds`` descending).  A small static menu of per-image retain ratios indexed by
    the bucket keeps every graph shape-static: images of one bucket run that bucket's rewrite."""
    t = torch.as_tensor(list(thresholds), dtype=redundancy.dtype, device=redundancy.device)
    if t.numel() > 1 and not bool((t[:-1] >= t[1:]).all()):
        raise ValueError(f"budget_bucket thresholds must be descending, got {list(thresholds)}")
    return (redundancy.unsqueeze(-1) < t).sum(-1)
