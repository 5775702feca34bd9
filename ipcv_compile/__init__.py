"""ipcv_compile: capture a ViT block stack with torch.export, locate blocks / attention / FFN,
rewrite the graph with IPCV, lower it.  No model names here: structure comes from a LocateSpec."""

from ipcv_core import __version__

from .api import IPCVModule, capture, rewrite, rewrite_graph
from .locate import GraphMap, LocateError, locate
from .passes.ipcv_rewrite import IPCVRewritePass, RewriteError
from .spec import LocateSpec
from .lower import BACKENDS, Lowered, lower
from .tensorrt_check import tensorrt_check

__all__ = ["__version__", "IPCVModule", "capture", "rewrite", "rewrite_graph", "GraphMap", "LocateError", "locate",
           "IPCVRewritePass", "RewriteError", "LocateSpec", "lower", "Lowered", "BACKENDS", "tensorrt_check"]
