"""DINOv2 (``transformers.Dinov2Model``): the eager IPCV driver helpers and the compiler adapter.

Blocks: ``encoder.layer[i]`` = norm1 -> attention (q/k/v/o projections) -> layer_scale1 -> +res,
norm2 -> mlp -> layer_scale2 -> +res.  One CLS token per image (protected), images are the batch
(one segment per image; one rewritten graph serves every batch size and resolution).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from torch import nn

from ipcv_core import AttnContext, Branches, IPCVConfig, SegmentLayout, run_blocks, run_ipcv
from ipcv_core.driver import DriverOutput

from .base import Prepared
from .common import BatchedViTAdapter, reject_kwargs
from .registry import register_adapter


def _attention_branch_keys(layer, x_q, x_kv, ctx: AttnContext):
    """The attention update of the query rows and the head-averaged keys it computed for the kv rows."""
    att = layer.attention
    nq, nkv = layer.norm1(x_q), layer.norm1(x_kv)
    B, Lq, _ = nq.shape
    Lkv = nkv.shape[1]
    H, hd = att.num_attention_heads, att.head_dim
    q = att.q_proj(nq).view(B, Lq, H, hd).transpose(1, 2)
    k = att.k_proj(nkv).view(B, Lkv, H, hd).transpose(1, 2)
    v = att.v_proj(nkv).view(B, Lkv, H, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.sdpa_mask(q.dtype), scale=att.scaling)
    o = att.o_proj(o.transpose(1, 2).reshape(B, Lq, H * hd))
    return layer.layer_scale1(o), k.mean(1)


def _attention_branch(layer, x_q, x_kv, ctx: AttnContext):
    return _attention_branch_keys(layer, x_q, x_kv, ctx)[0]


def _ffn_branch(layer, x):
    return layer.layer_scale2(layer.mlp(layer.norm2(x)))


def _key_features(layer, x, pos=None):  # no rotary: positions do not matter
    att = layer.attention
    B, L, _ = x.shape
    return att.k_proj(layer.norm1(x)).view(B, L, att.num_attention_heads, att.head_dim).mean(2)


def dinov2_branches(model) -> List[Branches]:
    """One :class:`ipcv_core.Branches` per ``encoder.layer[i]`` (no per-call state)."""
    return Branches.per_layer(model.encoder.layer, _attention_branch, _ffn_branch, _key_features,
                              _attention_branch_keys)


def dinov2_layout(model) -> SegmentLayout:
    return SegmentLayout.batched(protected=1 + int(getattr(model.config, "num_register_tokens", 0) or 0))


@torch.no_grad()
def dinov2_forward(model, pixel_values: torch.Tensor, config: IPCVConfig | None = None) -> Tuple[torch.Tensor, DriverOutput | None]:
    """``last_hidden_state`` (after the final layernorm) with IPCV through the eager driver
    (``config=None``: vanilla, through the same branch functions)."""
    emb = model.embeddings(pixel_values.to(model.dtype))
    if config is None:
        return model.layernorm(run_blocks(emb, dinov2_branches(model))), None
    res = run_ipcv(emb, dinov2_branches(model), config, dinov2_layout(model))
    return model.layernorm(res.hidden_states), res


def load_dinov2(path: str):
    """A ``Dinov2Model`` from a local folder or a hub id (eval mode, fp32)."""
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(path).eval()


@register_adapter
class Dinov2Adapter(BatchedViTAdapter):
    name = "dinov2"
    tower_classes = ("transformers.models.dinov2.modeling_dinov2.Dinov2Model",)
    spec = BatchedViTAdapter.make_spec(attention="attention")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.encoder.layer

    @property
    def protected(self) -> int:
        return dinov2_layout(self.tower).protected

    def prepare(self, pixel_values: torch.Tensor = None, bool_masked_pos=None, attention_mask=None, **kwargs) -> Prepared:
        req = self.output_request(kwargs)
        reject_kwargs(kwargs, "Dinov2Model")
        if attention_mask is not None:
            raise NotImplementedError("IPCV-rewritten Dinov2Model: attention_mask is not supported")
        if pixel_values is None:
            raise ValueError("Dinov2Model needs pixel_values")
        emb = self.tower.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        return Prepared(emb, (), self.layout(pixel_values, emb.shape[1]), req)

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        seq = self.tower.layernorm(hidden)
        out = BaseModelOutputWithPooling(
            last_hidden_state=seq,
            pooler_output=seq[:, 0, :],
            hidden_states=self.hidden_states_tuple(hidden, prep, taps),
        )
        return out if prep.request.return_dict else out.to_tuple()

    def branches(self, prep: Prepared) -> List[Branches]:
        return dinov2_branches(self.tower)
