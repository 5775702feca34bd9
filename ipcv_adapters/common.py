"""Pieces shared by the adapters of batched ViT towers (one image / tile per batch row)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from ipcv_compile.spec import LocateSpec
from ipcv_core.driver import AttnContext
from ipcv_core.segments import SegmentLayout

from .base import TowerAdapter, shells

__all__ = ["LayerStack", "BatchedViTAdapter", "run_stack", "split_qkv_attention", "reject_kwargs"]


def run_stack(blocks, hidden_states, taps, call):
    """``call(block, hidden_states)`` for every block; ``hidden_states``, or ``(hidden_states,
    *outputs of the blocks in taps)`` when there are taps."""
    tapped = []
    for i, blk in enumerate(blocks):
        hidden_states = call(blk, hidden_states)
        if i in taps:
            tapped.append(hidden_states)
    return (hidden_states, *tapped) if taps else hidden_states


class LayerStack(nn.Module):
    """``forward(hidden_states) -> hidden_states`` (or ``(hidden_states, *taps)``): the tower's own
    layers, called as the tower's encoder calls them without a mask (``layer(x)``, or
    ``layer(x, None)`` when the mask argument is positional and required)."""

    def __init__(self, layers: nn.ModuleList, mask_positional: bool = False, taps: Sequence[int] = ()):
        super().__init__()
        self.layers = layers
        self.mask_positional = mask_positional
        self.taps = tuple(taps)

    def forward(self, hidden_states: torch.Tensor):
        if self.mask_positional:
            return run_stack(self.layers, hidden_states, self.taps, lambda layer, x: layer(x, None))
        return run_stack(self.layers, hidden_states, self.taps, lambda layer, x: layer(x))


def split_qkv_attention(
    nq: torch.Tensor,
    nkv: torch.Tensor,
    ctx: AttnContext,
    q_proj: Callable,
    k_proj: Callable,
    v_proj: Callable,
    out_proj: Callable,
    num_heads: int,
    head_dim: int,
    scale: float,
    q_norm: Optional[Callable] = None,
    k_norm: Optional[Callable] = None,
) -> torch.Tensor:
    """Multi-head attention of normed query rows ``nq (B, Lq, D)`` over normed key/value rows
    ``nkv (B, Lkv, D)`` with separate q/k/v projections (optionally q/k norms over the full
    projection, as InternVL), SDPA with the context's mask, and the output projection."""
    B, Lq, _ = nq.shape
    Lkv = nkv.shape[1]
    q, k, v = q_proj(nq), k_proj(nkv), v_proj(nkv)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q = q.view(B, Lq, num_heads, head_dim).transpose(1, 2)
    k = k.view(B, Lkv, num_heads, head_dim).transpose(1, 2)
    v = v.view(B, Lkv, num_heads, head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.sdpa_mask(q.dtype), scale=scale)
    return out_proj(o.transpose(1, 2).reshape(B, Lq, num_heads * head_dim))


def reject_kwargs(kwargs: Dict[str, Any], tower_name: str) -> None:
    """Drop ``None``-valued keyword arguments; raise on any other leftover one (a drop-in must not
    silently ignore an input that changes the result)."""
    bad = sorted(k for k, v in kwargs.items() if v is not None)
    if bad:
        raise TypeError(f"IPCV-rewritten {tower_name}: unsupported keyword argument(s) {bad}")


class BatchedViTAdapter(TowerAdapter):
    """A tower whose block stack takes ``(B, N, D)`` with no side inputs; one segment per row."""

    packed = False
    #: LayerStack: call layers as ``layer(x, None)``
    mask_positional: bool = False
    #: extra tokens of the example input for capture (beyond the protected ones)
    _example_tokens = 11

    @property
    def hidden_size(self) -> int:
        return int(self.tower.config.hidden_size)

    def layout(self, pixel_values: Optional[torch.Tensor] = None, n_tokens: Optional[int] = None) -> SegmentLayout:
        """One segment per row; with ``pixel_values`` also the patch grid (row-major after the
        protected tokens), for the grid-aware variants."""
        grid = None
        # under torch.export the image size is symbolic: no grid (int() would specialise the export
        # to one image size); grid-aware variants then need an eager call or a per-size export
        if pixel_values is not None and all(isinstance(d, int) for d in pixel_values.shape[-2:]):
            ps = getattr(self.tower.config, "patch_size", None)
            ps = tuple(ps) if isinstance(ps, (list, tuple)) else (ps, ps)
            if ps[0]:
                grid = (int(pixel_values.shape[-2]) // int(ps[0]), int(pixel_values.shape[-1]) // int(ps[1]))
                if n_tokens is not None and grid[0] * grid[1] + self.protected != n_tokens:
                    grid = None  # not a plain patch grid: grid-aware variants unavailable
        return SegmentLayout.batched(self.protected, grid)

    def block_stack(self, taps: Sequence[int] = ()) -> nn.Module:
        return LayerStack(shells(self.blocks, self.attn_implementation), self.mask_positional, taps).eval()

    def example_inputs(self):
        n = self.protected + self._example_tokens
        x = torch.randn(2, n, self.hidden_size, dtype=self.dtype, device=self.device)
        # one prunable token is the smallest image (a one-patch image): the graph then keeps it
        # (K = ceil(r * 1) = 1), i.e. no pruning for that image, as the K rule says
        return (x,), ({0: Dim("batch", min=1), 1: Dim("tokens", min=self.protected + 1)},)

    @staticmethod
    def make_spec(attention: str, ffn: str = "mlp") -> LocateSpec:
        return LocateSpec(blocks="layers", attention=attention, ffn=ffn, hidden_input="hidden_states", token_dim=1)
