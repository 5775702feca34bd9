"""Keep-set selections other than IPCV's eq. (1) score (higher = keep; ``select_per_segment`` then
keeps the top ``K`` per segment).

* DART(ViT) — Wen et al., *Stop Looking for Important Tokens in Multimodal Language Models:
  Duplication Matters More*, 2025 (arXiv 2502.11494), applied at a ViT layer as in the IPCV paper;
  the keep set is :func:`ipcv_core.selection.dart_keep_mask` (the library's ``selection="dart"`` rule,
  re-exported here).  Pivots: the tokens whose attention keys have the largest L1 norm.  Then, pivot by pivot, the
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
from ipcv_core.selection import dart_keep_mask
from ipcv_core.variants import hash_of

__all__ = ["dart_keep_mask", "dart_scores", "row_seeds", "RANDOM_PER_IMAGE"]


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
