"""Per-layer reduction schedules for gradual methods (ToMe, ToFu) at equal final token count.

The IPCV paper's protocol (Appendix C): "tokens are reduced proportionally across layers until the
target sparsity is reached".  We read this as ToMe's constant schedule: the total reduction
``n - K`` (``K`` = the count IPCV keeps for the same retain ratio) is spread evenly over the blocks,
the remainder going to the earliest blocks, with ToMe's limit of merging at most half of the
prunable tokens in one block.  Where that limit would leave the target out of reach (only for very
small token counts or very few blocks), earlier blocks merge more.  For DINOv2-S (12 blocks) at
448 px (1024 patches) the schedule is constant up to the remainder, e.g. retain 0.2: 205 kept,
819 merged = 69 x 3 + 68 x 9.
"""

from __future__ import annotations

from typing import List

__all__ = ["even_schedule"]


def even_schedule(n: int, keep: int, depth: int) -> List[int]:
    """Merges per block so that ``n`` prunable tokens end at exactly ``keep`` after ``depth`` blocks.

    Raises ValueError when the target cannot be reached under the half-per-block limit."""
    if not (0 < keep <= n) or depth < 1:
        raise ValueError(f"need 0 < keep <= n and depth >= 1, got n={n}, keep={keep}, depth={depth}")
    out, cur = [], n
    for i in range(depth):
        left = depth - i  # blocks left, this one included
        r = -(-(cur - keep) // left)  # even share of what is left, remainder first
        r = max(r, cur - keep * 2 ** (left - 1))  # front-load when halving later could not finish
        r = min(r, cur // 2)
        out.append(r)
        cur -= r
    if cur != keep:
        raise ValueError(
            f"cannot reduce {n} tokens to {keep} in {depth} blocks merging at most half per block"
        )
    return out
