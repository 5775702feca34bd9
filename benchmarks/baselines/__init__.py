"""Baseline token-compression methods as pure tensor functions (see :mod:`benchmarks.methods` for
runners over a block stack).

* :mod:`.merging` — ToMe's bipartite soft matching, size-weighted merge, ToFu's MLERP merge and
  prune step, with size / source tracking and unmerge.
* :mod:`.schedule` — per-layer merge counts reaching a target token count.
* :mod:`.selection` — DART(ViT)'s duplication-aware keep set, seeded random keep sets.
* :mod:`.restore` — restoring removed tokens by copying the nearest kept token.
"""

from .merging import (
    Matching,
    MergeTracker,
    bipartite_soft_matching,
    merge_mlerp,
    merge_prune,
    merge_rows,
    merge_wavg,
    mlerp,
    new_positions,
)
from .restore import copy_nearest, nearest_kept
from .schedule import even_schedule
from .selection import RANDOM_PER_IMAGE, dart_keep_mask, dart_scores, row_seeds

__all__ = [
    "Matching", "MergeTracker", "bipartite_soft_matching", "merge_mlerp", "merge_prune", "merge_rows",
    "merge_wavg", "mlerp", "new_positions",
    "copy_nearest", "nearest_kept",
    "even_schedule",
    "dart_keep_mask", "dart_scores", "row_seeds", "RANDOM_PER_IMAGE",
]
