"""Workarounds applied to a captured graph before ``ipcv_compile.rewrite_graph``.

These belong in the compiler; each is a no-op once the compiler handles the case itself.

``pin_inferred_sizes``: transformers' attention modules reshape with an inferred size, e.g.
``q_proj(x).view(*x.shape[:-1], -1, head_dim)`` and ``out.reshape(*x.shape[:-1], -1)`` (DINOv2,
SigLIP, CLIP, ...), so export records ``view(t, [B, N, -1, 16])``.  The rewrite pass re-points the
token-count entry ``N`` to ``-1`` so the reshape follows the kept-row count, and refuses shapes that
already hold a ``-1``.  Here every ``-1`` whose resolved size is static (in ``node.meta["val"]``) is
replaced by that size, which leaves the graph's results unchanged.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["pin_inferred_sizes"]

_RESHAPES = (
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
)


def pin_inferred_sizes(gm: fx.GraphModule) -> int:
    """Replace each ``-1`` in view/reshape shapes by its static resolved size; returns the count."""
    fixed = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _RESHAPES:
            continue
        shape = list(n.args[1])
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or len(shape) != val.dim():
            continue
        changed = False
        for i, s in enumerate(shape):
            if isinstance(s, int) and s == -1 and isinstance(val.shape[i], int):
                shape[i] = int(val.shape[i])
                changed = True
        if changed:
            n.args = (n.args[0], shape) + tuple(n.args[2:])
            fixed += 1
    if fixed:
        gm.recompile()
    return fixed
