"""InternVL3's vision tower (transformers-native ``InternVLVisionModel``, ``model.model.vision_tower``).

Layout: tiles are the batch dimension, ``(tiles, 1 + h*w, D)``, one IPCV segment per tile
(``K = ceil(r * h * w)`` per tile); the CLS token (index 0) is protected: never removed, never a
neighbour, kept at index 0.  One rewritten graph serves any number of tiles.

Blocks ``encoder.layer[i]``: ``x + lambda_1 * attention(layernorm_before(x))``,
``x + lambda_2 * mlp(layernorm_after(x))`` (LayerScale as bare parameters on the layer), split
``q/k/v_proj`` with ``q_norm`` / ``k_norm`` (RMSNorm over the full projection) when
``use_qk_norm``.  Output: ``InternVLVisionModelOutputWithPooling`` of the original shape, so
``get_image_features``' CLS drop, ``pixel_shuffle`` and the projector work unchanged.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from ipcv_core.driver import AttnContext, Branches

from .base import Prepared
from .common import BatchedViTAdapter, reject_kwargs, split_qkv_attention
from .registry import register_adapter

__all__ = ["InternVLVisionAdapter"]


@register_adapter
class InternVLVisionAdapter(BatchedViTAdapter):
    name = "internvl_vision"
    tower_classes = ("transformers.models.internvl.modeling_internvl.InternVLVisionModel",)
    spec = BatchedViTAdapter.make_spec(attention="attention")
    default_config = dict(prune_layer=7, as_depth=3)  # the paper's InternVL3-38B runs

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layer

    @property
    def protected(self) -> int:
        return 1

    def prepare(self, pixel_values: torch.Tensor, bool_masked_pos=None, **kwargs) -> Prepared:
        req = self.output_request(kwargs)
        reject_kwargs(kwargs, "InternVLVisionModel")
        emb = self.tower.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        return Prepared(emb, (), self.layout(pixel_values, emb.shape[1]), req)

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.models.internvl.modeling_internvl import InternVLVisionModelOutputWithPooling

        out = InternVLVisionModelOutputWithPooling(
            last_hidden_state=self.tower.layernorm(hidden),
            hidden_states=self.hidden_states_tuple(hidden, prep, taps),
        )
        return out if prep.request.return_dict else out.to_tuple()

    def branches(self, prep: Prepared) -> List[Branches]:
        def attention(layer, x_q, x_kv, ctx: AttnContext):
            a = layer.attention
            o = split_qkv_attention(
                layer.layernorm_before(x_q), layer.layernorm_before(x_kv), ctx,
                a.q_proj, a.k_proj, a.v_proj, lambda t: a.projection_dropout(a.projection_layer(t)),
                a.num_heads, a.head_dim, a.scale, a.q_norm, a.k_norm,
            )
            return layer.lambda_1 * o

        def ffn(layer, x):
            y = layer.dropout(layer.mlp(layer.layernorm_after(x)))
            return y if layer.lambda_2 is None else layer.lambda_2 * y

        def keys(layer, x, pos=None):  # no rotary: positions do not matter
            a = layer.attention
            k = a.k_norm(a.k_proj(layer.layernorm_before(x)))
            B, L, _ = k.shape
            return k.view(B, L, a.num_heads, a.head_dim).mean(2)

        return Branches.per_layer(self.blocks, attention, ffn, keys)
