"""The IPCV rewrite as a pipeline of small ``torch.fx`` passes (see :mod:`.ipcv_rewrite`)."""

from .context import RewriteError, RewriteReport
from .ipcv_rewrite import PIPELINE, IPCVRewritePass, expected_rows, query_rows

__all__ = ["IPCVRewritePass", "RewriteError", "RewriteReport", "PIPELINE", "expected_rows", "query_rows"]
