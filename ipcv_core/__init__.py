"""ipcv_core: the IPCV math as pure tensor functions, plus an eager driver.

No model knowledge lives here: see ``ipcv_adapters`` for models and ``ipcv_compile`` for graphs.
"""

from ._version import __version__
from .config import IPCVConfig, gradual_stages, num_keep, retain_fraction
from .driver import AttnContext, Block, Branches, DriverOutput, run_blocks, run_ipcv
from .reconstruct import knn_kept, neighbour_weights, ngr, pairwise_sq_dist, restore
from .segments import SegmentLayout, SegmentPlan, SegmentSpec, plan_segments, segment_ids, segment_mask
from .selection import feature_difference_score, gather_rows, select_per_segment

__all__ = [
    "__version__",
    "IPCVConfig", "num_keep", "retain_fraction", "gradual_stages",
    "AttnContext", "Block", "Branches", "DriverOutput", "run_blocks", "run_ipcv",
    "knn_kept", "neighbour_weights", "ngr", "pairwise_sq_dist", "restore",
    "SegmentLayout", "SegmentPlan", "SegmentSpec", "plan_segments", "segment_ids", "segment_mask",
    "feature_difference_score", "gather_rows", "select_per_segment",
]
