"""SigLIP (``SiglipVisionModel``) and CLIP (``CLIPVisionModel``) vision towers.

Both: images are the batch (one segment per image), blocks ``encoder.layers[i]`` =
``x + self_attn(layer_norm1(x))``, ``x + mlp(layer_norm2(x))`` with split ``q/k/v_proj`` and
``out_proj``.  SigLIP has no CLS token (nothing protected; the MAP ``head`` pools the reintegrated
tokens); CLIP has one (protected) and applies ``pre_layrnorm`` before the blocks (in ``prepare``)
and ``post_layernorm`` to the CLS row for ``pooler_output``.

This file is also the shortest example of a complete adapter.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ipcv_core.driver import AttnContext, Branches

from .base import Prepared
from .common import BatchedViTAdapter, reject_kwargs, split_qkv_attention
from .registry import register_adapter

__all__ = ["SiglipVisionAdapter", "CLIPVisionAdapter"]


class _EncoderLayersAdapter(BatchedViTAdapter):
    """``encoder.layers[i]`` with ``layer_norm1 / self_attn / layer_norm2 / mlp``."""

    spec = BatchedViTAdapter.make_spec(attention="self_attn")
    mask_positional = True  # layer(hidden_states, attention_mask) — the mask is a required argument

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layers

    def branches(self, prep: Prepared) -> List[Branches]:
        def attention(layer, x_q, x_kv, ctx: AttnContext):
            a = layer.self_attn
            return split_qkv_attention(layer.layer_norm1(x_q), layer.layer_norm1(x_kv), ctx,
                                       a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.head_dim, a.scale)

        def ffn(layer, x):
            return layer.mlp(layer.layer_norm2(x))

        def keys(layer, x, pos=None):  # no rotary: positions do not matter
            a = layer.self_attn
            k = a.k_proj(layer.layer_norm1(x))
            B, L, _ = k.shape
            return k.view(B, L, a.num_heads, a.head_dim).mean(2)

        return Branches.per_layer(self.blocks, attention, ffn, keys)


@register_adapter
class SiglipVisionAdapter(_EncoderLayersAdapter):
    name = "siglip_vision"
    tower_classes = ("transformers.models.siglip.modeling_siglip.SiglipVisionModel",)

    def prepare(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs) -> Prepared:
        req = self.output_request(kwargs)
        reject_kwargs(kwargs, "SiglipVisionModel")
        emb = self.tower.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        return Prepared(emb, (), self.layout(pixel_values, emb.shape[1]), req)

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        t = self.tower
        last = t.post_layernorm(hidden)
        out = BaseModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=t.head(last) if t.use_head else None,
            hidden_states=self.hidden_states_tuple(hidden, prep, taps),
        )
        return out if prep.request.return_dict else out.to_tuple()


@register_adapter
class CLIPVisionAdapter(_EncoderLayersAdapter):
    name = "clip_vision"
    tower_classes = ("transformers.models.clip.modeling_clip.CLIPVisionModel",)

    @property
    def protected(self) -> int:
        return 1

    def prepare(self, pixel_values: torch.Tensor = None, interpolate_pos_encoding: bool = False, **kwargs) -> Prepared:
        req = self.output_request(kwargs)
        reject_kwargs(kwargs, "CLIPVisionModel")
        if pixel_values is None:
            raise ValueError("CLIPVisionModel needs pixel_values")
        t = self.tower
        emb = t.pre_layrnorm(t.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding)))
        return Prepared(emb, (), self.layout(pixel_values, emb.shape[1]), req)

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.tower.post_layernorm(hidden[:, 0, :]),
            hidden_states=self.hidden_states_tuple(hidden, prep, taps),
        )
        return out if prep.request.return_dict else out.to_tuple()
