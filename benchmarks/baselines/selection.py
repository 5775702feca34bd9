"""Keep-set selections other than IPCV's eq. (1) score (higher = keep; ``select_per_segment`` then
keeps the top ``K`` per segment).

* DART(ViT) — Wen et al., *Stop Looking for Important Tokens in Multimodal Language Models:
  Duplication Matters More*, 2025 (arXiv 2502.11494), applied at a ViT layer as in the IPCV paper.
  Pivots: the tokens whose attention keys have the largest L1 norm.  Then, pivot by pivot, the
  not-yet-kept tokens *least* cosine-similar to that pivot are kept (duplication-aware), the budget
  ``K - #pivots`` split evenly over the pivots (earlier pivots get the remainder), so exactly ``K``
  tokens are kept.  Our adaptation to a ViT: keys are those of block ``l_p`` at ``H_lp``, averaged
  over heads (what the ``Block`` protocol's ``key_features`` gives; DART concatenates the heads),
  and the cosine is taken on the raw hidden states ``H_lp`` (DART uses the LLM's normed states).
* Random per image — the selection rule ``"random_per_image"`` (registered in
  :mod:`ipcv_core.rules` on import): IPCV's own hashed random score (:func:`ipcv_core.variants.hash_of`
  of the token positions) with a seed per image derived from the image's own input (a CRC of its
  rows of the block stack's input: per batch row, and per image / frame of a packed row), so every
  image gets its own random keep set and no image's set depends on the other images of its call.  Eager only (it reads tensor bytes).
"""

from __future__ import annotations

import zlib

import torch

from ipcv_core.rules import ScoreInputs, SelectionRule, register_selection
from ipcv_core.variants import hash_of

__all__ = ["dart_keep_mask", "dart_scores", "row_seeds", "RANDOM_PER_IMAGE"]


def dart_keep_mask(h: torch.Tensor, keys: torch.Tensor, keep: int, num_pivots: int = 8) -> torch.Tensor:
    """DART's duplication-aware keep set over the prunable tokens of each row.

    Args:
        h: ``(B, n, D)`` hidden states of the prunable tokens (cosine similarity).
        keys: ``(B, n, C)`` their attention keys (pivot choice by L1 norm).
        keep: tokens kept per row, ``1 <= keep <= n``.
    Returns:
        ``(B, n)`` bool with exactly ``keep`` True per row; the pivots are always kept.
    """
    B, n, _ = h.shape
    if not 1 <= keep <= n:
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


def dart_scores(h: torch.Tensor, keys: torch.Tensor, protected: int, keep: int, num_pivots: int = 8) -> torch.Tensor:
    """``(B, N)`` scores whose top ``keep`` prunable tokens are DART's keep set (1 kept, 0 not)."""
    mask = dart_keep_mask(h[:, protected:], keys[:, protected:], keep, num_pivots)
    s = torch.zeros(h.shape[0], h.shape[1], device=h.device)
    s[:, protected:] = mask.float()
    return s


def row_seeds(h: torch.Tensor, seed: int) -> torch.Tensor:
    """``(B, 1)`` int64 seeds, one per row of ``h (B, ...)``: ``seed`` mixed with a CRC of the row's
    bytes (below 2**31, so the hash's integer arithmetic stays exact)."""
    rows = h.detach().float().cpu().contiguous()
    seeds = [(seed * 1_000_003 + zlib.crc32(rows[b].numpy().tobytes())) % (2**31) for b in range(rows.shape[0])]
    return torch.tensor(seeds, dtype=torch.long, device=h.device).unsqueeze(1)


def _random_per_image(s: ScoreInputs) -> torch.Tensor:
    """Per segment (image / frame of a packed row, or the whole row): the seed is a CRC of the
    segment's own original rows (the block stack's input at the current rows' positions, which
    depend on that image only), so no image's keep set depends on another image in the call."""
    within = s.positions if s.segment_positions is None else s.segment_positions
    out = torch.empty(s.positions.shape, dtype=torch.float32, device=s.positions.device)
    for seg in s.plan.segments:
        rows = slice(int(seg.start), int(seg.start) + int(seg.length))
        pos = s.positions[:, rows]
        x = torch.gather(s.x0, 1, pos.unsqueeze(-1).expand(-1, -1, s.x0.shape[-1]))
        out[:, rows] = hash_of(within[:, rows], row_seeds(x, s.seed))
    return out


RANDOM_PER_IMAGE = register_selection(SelectionRule(
    "random_per_image", _random_per_image, exportable=False,
    description="IPCV's hashed random score with a seed per image from the image's own input (benchmark baseline)"))
