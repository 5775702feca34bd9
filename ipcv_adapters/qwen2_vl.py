"""Qwen2-VL's vision tower (``Qwen2VisionTransformerPretrainedModel``, ``model.model.visual``).

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

from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from ipcv_compile.spec import LocateSpec
from ipcv_core.driver import AttnContext, Branches
from ipcv_core.segments import SegmentLayout

from .attention import register_packed_sdpa
from .base import Prepared, TowerAdapter, pop_output_request, shells
from .common import reject_kwargs
from .registry import register_adapter

__all__ = ["Qwen2VLAdapter", "Qwen2VLBlockStack", "segment_lengths"]


class Qwen2VLBlockStack(nn.Module):
    """``forward(hidden_states (N, D), cos, sin) -> (N, D)`` over the tower's blocks."""

    def __init__(self, blocks: nn.ModuleList):
        super().__init__()
        self.blocks = blocks

    def forward(self, hidden_states, cos, sin):
        for blk in self.blocks:
            # cu_seqlens is unused by the packed function; max_seqlen given -> no .item() in the tower
            hidden_states = blk(hidden_states, cu_seqlens=None, position_embeddings=(cos, sin), max_seqlen=0)
        return hidden_states


def segment_lengths(cu_seqlens: torch.Tensor) -> tuple:
    """``cu_seqlens (S+1,)`` -> the segment lengths as ints."""
    return tuple(int(v) for v in (cu_seqlens[1:] - cu_seqlens[:-1]).tolist())


def _rows(table: torch.Tensor, pos) -> torch.Tensor:
    """Rows of a per-token table ``(N, E)`` at positions ``pos (B, L)`` (None = all): ``(B, L, E)``."""
    return table.unsqueeze(0) if pos is None else table[pos]


@register_adapter
class Qwen2VLAdapter(TowerAdapter):
    name = "qwen2_vl"
    tower_classes = ("transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel",)
    packed = True
    spec = LocateSpec(blocks="blocks", attention="attn", ffn="mlp", hidden_input="hidden_states", token_dim=0)

    @property
    def attn_implementation(self) -> str:  # type: ignore[override]
        return register_packed_sdpa()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.blocks

    # ------------------------------------------------------------------ capture
    def block_stack(self) -> nn.Module:
        return Qwen2VLBlockStack(shells(self.blocks, self.attn_implementation)).eval()

    def example_inputs(self):
        t = self.tower
        thw = torch.tensor([[1, 4, 4], [1, 2, 4]], device=self.device)  # two segments: 16 + 8 tokens
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        pos = get_vision_position_ids(thw, t.spatial_merge_size)
        cu, _ = get_vision_attention_seqlens(thw, t.config)
        n = int(cu[-1])
        x = torch.randn(n, t.config.embed_dim, dtype=self.dtype, device=self.device)
        cos, sin = t.rotary_pos_emb(x, pos)
        N = Dim("tokens", min=2)
        return (x, cos, sin), ({0: N}, {0: N}, {0: N})

    # ------------------------------------------------------------------ per call
    def prepare(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor = None, **kwargs) -> Prepared:
        """``tower(hidden_states=pixel patches (N, C*tps*ps*ps), grid_thw (S, 3))``; precomputed
        ``position_ids`` / ``cu_seqlens`` / ``max_seqlen`` are honoured as by the original tower."""
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        t = self.tower
        req = pop_output_request(kwargs, t.config, self.depth)
        if grid_thw is None:
            raise ValueError("Qwen2-VL's vision tower needs grid_thw")
        pos = get_vision_position_ids(grid_thw, t.spatial_merge_size, kwargs=kwargs)
        cu, _ = get_vision_attention_seqlens(grid_thw, t.config, kwargs=kwargs)
        reject_kwargs(kwargs, "Qwen2-VL vision tower")
        x = self.embed(hidden_states)
        cos, sin = t.rotary_pos_emb(x, pos)
        lengths = segment_lengths(cu)
        if sum(lengths) != x.shape[0]:
            raise ValueError(f"grid_thw / cu_seqlens describe {sum(lengths)} patches but hidden_states has {x.shape[0]}")
        m = int(t.spatial_merge_size)
        grids = [(int(h), int(w)) for tt, h, w in grid_thw.tolist() for _ in range(int(tt))]
        if [h * w for h, w in grids] != list(lengths):
            grids = None  # segments are not one frame each: grid-aware variants unavailable
        layout = SegmentLayout.packed(lengths, 0, grids, m if grids is not None else 1)
        return Prepared(x, (cos, sin), layout, req, {"grid_thw": grid_thw})

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower.patch_embed(pixel_values)

    def finish(self, hidden: torch.Tensor, prep: Prepared):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.tower.merger(hidden),
            hidden_states=self.hidden_states_tuple(hidden, prep),
        )
        return out if prep.request.return_dict else out.to_tuple()

    # ------------------------------------------------------------------ eager branches
    def branches(self, prep: Prepared) -> List[Branches]:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        cos, sin = prep.side[0], prep.side[1]

        def rotate(t, pos):  # t (B, L, H, hd)
            c, s = _rows(cos, pos), _rows(sin, pos)
            return apply_rotary_pos_emb_vision(t, t, c, s)[0]

        def attention(blk, x_q, x_kv, ctx: AttnContext):
            a = blk.attn
            D, H = a.dim, a.num_heads
            hd = D // H
            nq, nkv = blk.norm1(x_q), blk.norm1(x_kv)
            B, Lq, _ = nq.shape
            Lkv = nkv.shape[1]
            w, b = a.qkv.weight, a.qkv.bias
            q = F.linear(nq, w[:D], None if b is None else b[:D]).view(B, Lq, H, hd)
            kv = F.linear(nkv, w[D:], None if b is None else b[D:]).view(B, Lkv, 2, H, hd)
            k, v = kv.unbind(2)
            q, k = rotate(q, ctx.q_pos), rotate(k, ctx.kv_pos)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=ctx.sdpa_mask(q.dtype), scale=a.scaling)
            return a.proj(o.transpose(1, 2).reshape(B, Lq, D))

        def ffn(blk, x):
            return blk.mlp(blk.norm2(x))

        def keys(blk, x, pos=None):  # as SDPA sees them: rotary at the rows' original positions
            a = blk.attn
            D, H = a.dim, a.num_heads
            n = blk.norm1(x)
            B, L, _ = n.shape
            k = F.linear(n, a.qkv.weight[D:2 * D], None if a.qkv.bias is None else a.qkv.bias[D:2 * D])
            return rotate(k.view(B, L, H, D // H), pos).mean(2)

        return Branches.per_layer(self.blocks, attention, ffn, keys)
