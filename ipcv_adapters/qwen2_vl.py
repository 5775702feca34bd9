"""Qwen2-VL's vision tower (``Qwen2VisionTransformerPretrainedModel``, ``model.model.visual``), and
:class:`QwenVisionAdapter`, the base of the Qwen family's towers (Qwen2.5-VL, Qwen3-VL, Qwen3.5:
:mod:`ipcv_adapters.qwen_family`).

Layout: all images and videos of a call are packed into one sequence ``(N, D)`` (no batch dim);
``grid_thw`` rows ``[t, h, w]`` give each entry's patches.  Attention is per frame
(``cu_seqlens`` has ``t`` segments for a video), so an IPCV **segment is one frame of one image /
video**: ``K = ceil(r * h * w)`` per frame, neighbours from the same frame.  Nothing is protected.

Blocks ``blocks[i]``: ``x + attn(norm1(x), rotary cos/sin)``, ``x + mlp(norm2(x))``; fused ``qkv``,
2-D rotary applied in fp32.  The block stack takes ``(hidden (N, D), cos (N, hd), sin (N, hd))``
and runs the tower's blocks with the packed attention function of :mod:`ipcv_adapters.attention`
(one SDPA per block over the whole sequence, one dynamic token dim); the rewrite for the call's
layout makes every SDPA attend within each frame (``ipcv.segment_attention``: no ``N x N`` mask
anywhere, frames of a video and same-size images batched into one SDPA).  After the blocks the
sequence is reintegrated (full length, original order), so the unchanged ``PatchMerger`` sees whole
``m x m`` groups: ``last_hidden_state`` (pre-merger) and ``pooler_output`` (merged) have the shapes
and order of the original tower's.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from ipcv_compile.spec import LocateSpec
from ipcv_core.driver import AttnContext, Branches
from ipcv_core.segments import SegmentLayout

from .attention import register_packed_sdpa
from .base import Prepared, TowerAdapter, shells
from .common import reject_kwargs, run_stack
from .registry import register_adapter

__all__ = ["QwenVisionAdapter", "Qwen2VLAdapter", "Qwen2VLBlockStack", "segment_lengths"]


class Qwen2VLBlockStack(nn.Module):
    """``forward(hidden_states (N, D), cos, sin) -> (N, D)`` (or ``(out, *taps)``) over the tower's
    blocks.  cu_seqlens is unused by the packed attention function; max_seqlen given -> no .item()."""

    def __init__(self, blocks: nn.ModuleList, taps: Sequence[int] = ()):
        super().__init__()
        self.blocks = blocks
        self.taps = tuple(taps)

    def forward(self, hidden_states, cos, sin):
        return run_stack(self.blocks, hidden_states, self.taps,
                         lambda blk, x: blk(x, cu_seqlens=None, position_embeddings=(cos, sin), max_seqlen=0))


def segment_lengths(cu_seqlens: torch.Tensor) -> tuple:
    """``cu_seqlens (S+1,)`` -> the segment lengths as ints."""
    return tuple(int(v) for v in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist())


def _rows(table: torch.Tensor, pos) -> torch.Tensor:
    """Rows of a per-token table ``(N, E)`` at positions ``pos (B, L)`` (None = all): ``(B, L, E)``."""
    return table.unsqueeze(0) if pos is None else table[pos]


class QwenVisionAdapter(TowerAdapter):
    """A Qwen-family packed vision tower: ``blocks[i](x, cu_seqlens, position_embeddings)`` with
    ``norm1 / attn (fused qkv, 2-D rotary) / norm2 / mlp``, one segment per image / video frame.
    Subclasses say how the stack's input is made (:meth:`stack_rows`) and what comes out
    (:meth:`finish`)."""

    packed = True
    spec = LocateSpec(blocks="blocks", attention="attn", ffn="mlp", hidden_input="hidden_states", token_dim=0)
    #: the tower family's name in error messages
    title = "Qwen vision tower"

    @property
    def attn_implementation(self) -> str:  # type: ignore[override]
        return register_packed_sdpa()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.blocks

    @property
    def width(self) -> int:
        return int(self.blocks[0].attn.qkv.in_features)

    # ------------------------------------------------------------------ capture
    def block_stack(self, taps: Sequence[int] = ()) -> nn.Module:
        return Qwen2VLBlockStack(shells(self.blocks, self.attn_implementation), taps).eval()

    def example_inputs(self):
        t = self.tower
        thw = torch.tensor([[1, 4, 4], [1, 2, 4]], device=self.device)  # two segments: 16 + 8 tokens
        from transformers.vision_utils import get_vision_position_ids

        pos = get_vision_position_ids(thw, t.spatial_merge_size)
        x = torch.randn(int(pos.shape[0]), self.width, dtype=self.dtype, device=self.device)
        cos, sin = t.rotary_pos_emb(x, pos)
        N = Dim("tokens", min=2)
        return (x, cos, sin), ({0: N}, {0: N}, {0: N})

    # ------------------------------------------------------------------ per call
    def prepare(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor = None, **kwargs) -> Prepared:
        """``tower(hidden_states=pixel patches (N, C*tps*ps*ps), grid_thw (S, 3))``; precomputed
        ``position_ids`` / ``cu_seqlens`` / ``max_seqlen`` (and the family's own precomputable
        inputs) are honoured as by the original tower."""
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        t = self.tower
        req = self.output_request(kwargs)
        if grid_thw is None:
            raise ValueError(f"{self.title} needs grid_thw")
        pos = get_vision_position_ids(grid_thw, t.spatial_merge_size, kwargs=kwargs)
        cu, _ = get_vision_attention_seqlens(grid_thw, t.config, kwargs=kwargs)
        lengths = segment_lengths(cu)
        x, cos, sin, extra = self.stack_rows(hidden_states, grid_thw, pos, kwargs)
        reject_kwargs(kwargs, self.title)
        if sum(lengths) != x.shape[0]:
            raise ValueError(f"grid_thw / cu_seqlens describe {sum(lengths)} patches but hidden_states has {x.shape[0]}")
        layout = self.layout_of(grid_thw, lengths, extra)
        return Prepared(x, (cos, sin), layout, req, {"grid_thw": grid_thw, **extra})

    def stack_rows(self, hidden_states, grid_thw, pos, kwargs):
        """Pixel patches -> ``(rows entering block 0, cos, sin, context)`` in the stack's order."""
        x = self.embed(hidden_states, {})
        cos, sin = self.tower.rotary_pos_emb(x, pos)
        return x, cos, sin, {}

    def layout_of(self, grid_thw, lengths, extra) -> SegmentLayout:
        """One segment per frame; the patch grid (in the 2x2 merge order) for grid-aware variants."""
        m = int(self.tower.spatial_merge_size)
        grids = [(int(h), int(w)) for tt, h, w in grid_thw.tolist() for _ in range(int(tt))]
        if [h * w for h, w in grids] != list(lengths):
            grids = None  # segments are not one frame each: grid-aware variants unavailable
        return SegmentLayout.packed(lengths, 0, grids, m if grids is not None else 1)

    def embed(self, pixel_values: torch.Tensor, context=None) -> torch.Tensor:
        """The pixel-dependent part of :meth:`prepare` (``context``: the layout-dependent values it
        needs, from a :class:`Prepared` of the same layout)."""
        return self.tower.patch_embed(pixel_values)

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.tower.merger(hidden),
            hidden_states=self.hidden_states_tuple(hidden, prep, taps),
        )
        return out if prep.request.return_dict else out.to_tuple()

    # ------------------------------------------------------------------ eager branches
    def window_mask(self, layer: int, prep: Prepared):
        """``(q_pos, kv_pos) -> bool mask`` restricting ``layer``'s attention to windows, or None."""
        return None

    def branches(self, prep: Prepared) -> List[Branches]:
        cos, sin = prep.side[0], prep.side[1]

        def rotate(t, pos):  # t (B, L, H, hd): x * cos + rotate_half(x) * sin in fp32, as the towers do
            c, s = _rows(cos, pos).unsqueeze(-2).float(), _rows(sin, pos).unsqueeze(-2).float()
            tf = t.float()
            half = tf.shape[-1] // 2
            rot = torch.cat((-tf[..., half:], tf[..., :half]), dim=-1)
            return (tf * c + rot * s).to(t.dtype)

        def attention(blk, x_q, x_kv, ctx: AttnContext):
            a = blk.attn
            D, H = a.qkv.in_features, a.num_heads
            hd = D // H
            nq, nkv = blk.norm1(x_q), blk.norm1(x_kv)
            B, Lq, _ = nq.shape
            Lkv = nkv.shape[1]
            w, b = a.qkv.weight, a.qkv.bias
            q = F.linear(nq, w[:D], None if b is None else b[:D]).view(B, Lq, H, hd)
            kv = F.linear(nkv, w[D:], None if b is None else b[D:]).view(B, Lkv, 2, H, hd)
            k, v = kv.unbind(2)
            q, k = rotate(q, ctx.q_pos), rotate(k, ctx.kv_pos)
            mask = ctx.sdpa_mask(q.dtype)
            win = windows.get(id(blk))
            if win is not None:
                wm = win(ctx.q_pos, ctx.kv_pos)
                mask = wm if mask is None else (mask & wm if mask.dtype == torch.bool else mask.masked_fill(~wm, float("-inf")))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask, scale=a.scaling)
            return a.proj(o.transpose(1, 2).reshape(B, Lq, D))

        def ffn(blk, x):
            return blk.mlp(blk.norm2(x))

        def keys(blk, x, pos=None):  # as SDPA sees them: rotary at the rows' original positions
            a = blk.attn
            D, H = a.qkv.in_features, a.num_heads
            n = blk.norm1(x)
            B, L, _ = n.shape
            k = F.linear(n, a.qkv.weight[D:2 * D], None if a.qkv.bias is None else a.qkv.bias[D:2 * D])
            return rotate(k.view(B, L, H, D // H), pos).mean(2)

        windows = {id(blk): self.window_mask(i, prep) for i, blk in enumerate(self.blocks)}
        windows = {k: v for k, v in windows.items() if v is not None}
        return Branches.per_layer(self.blocks, attention, ffn, keys)


@register_adapter
class Qwen2VLAdapter(QwenVisionAdapter):
    name = "qwen2_vl"
    tower_classes = ("transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",)
    title = "Qwen2-VL's vision tower"
