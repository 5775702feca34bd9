"""The Qwen family's newer vision towers, on :class:`~ipcv_adapters.qwen2_vl.QwenVisionAdapter`:

* **Qwen2.5-VL** (``Qwen2_5_VisionTransformerPretrainedModel``): tokens are permuted into window
  order (groups of ``spatial_merge_size²`` patches, ``window_index``) before the blocks; blocks not
  in ``fullatt_block_indexes`` attend within windows of ``window_size`` px (``cu_window_seqlens``),
  the others within the frame.  RMSNorm, SwiGLU MLP.  IPCV segment = frame (its windows are
  consecutive in window order); the layout carries each frame's windows and the rewrite attends per
  window before pruning, and per frame among the rows of the same window after it
  (``ipcv.segment_attention`` with window groups — a ``K_i x K_i`` / ``K_i x n_i`` mask per frame,
  never across frames).  ``last_hidden_state`` stays in window order, as the original's; the
  merger's output is put back in raster order (``argsort(window_index)``), as the original does.
* **Qwen3-VL** (``Qwen3VLVisionModel``): learned position embeddings (interpolated to each grid)
  added to the patch embeddings, 2-D rotary; the outputs of ``deepstack_visual_indexes`` blocks feed
  ``deepstack_merger_list`` — block-stack *taps*, each restored to the full sequence by NGR at its
  block (``deepstack_features``).
* **Qwen3.5** (``Qwen3_5VisionModel``): Qwen3-VL's tower without deepstack.

Grid-aware variants (stratified selection, spatial neighbours) need the raster patch grid; Qwen2.5's
window order is not the 2x2 merge order they assume, so they are unavailable there (a clear error).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from ipcv_compile.spec import LocateSpec
from ipcv_core.segments import SegmentLayout

from .base import Prepared
from .qwen2_vl import QwenVisionAdapter, segment_lengths
from .registry import register_adapter

__all__ = ["Qwen2_5VLAdapter", "Qwen3VLAdapter", "Qwen3_5Adapter"]


def frames_of_windows(window_lengths: Sequence[int], frame_lengths: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """The consecutive windows grouped by the frame they lie in."""
    out, it = [], iter(window_lengths)
    for n in frame_lengths:
        ws, total = [], 0
        while total < n:
            w = next(it)
            ws.append(w)
            total += w
        if total != n:
            raise ValueError(f"attention windows {list(window_lengths)} do not tile the frames {list(frame_lengths)}")
        out.append(tuple(ws))
    return tuple(out)


@register_adapter
class Qwen2_5VLAdapter(QwenVisionAdapter):
    name = "qwen2_5_vl"
    tower_classes = ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",)
    title = "Qwen2.5-VL's vision tower"

    @property
    def spec(self) -> LocateSpec:  # type: ignore[override]
        full = set(self.tower.fullatt_block_indexes)
        return LocateSpec(blocks="blocks", attention="attn", ffn="mlp", hidden_input="hidden_states", token_dim=0,
                          windowed_blocks=tuple(i for i in range(self.depth) if i not in full))

    def stack_rows(self, hidden_states, grid_thw, pos, kwargs):
        from transformers.vision_utils import get_vision_window_index

        t = self.tower
        window_index, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=t.spatial_merge_size,
                                                          window_size=t.window_size, patch_size=t.patch_size,
                                                          kwargs=kwargs)
        kwargs.pop("max_window_seqlen", None)
        ctx = {"window_index": window_index, "window_lengths": segment_lengths(cu_window)}
        x = self.embed(hidden_states, ctx)
        n = x.shape[0]
        cos, sin = t.rotary_pos_emb(x, pos)
        cos, sin = (t.permute_input_for_window_attn(f, window_index, seq_len=n) for f in (cos, sin))
        return x, cos, sin, ctx

    def embed(self, pixel_values: torch.Tensor, context=None) -> torch.Tensor:
        x = self.tower.patch_embed(pixel_values)
        return self.tower.permute_input_for_window_attn(x, context["window_index"], seq_len=x.shape[0])

    def layout_of(self, grid_thw, lengths, extra) -> SegmentLayout:
        return SegmentLayout.packed(lengths, windows=frames_of_windows(extra["window_lengths"], lengths))

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        merged = self.tower.merger(hidden)[torch.argsort(prep.context["window_index"])]
        out = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged,
                                         hidden_states=self.hidden_states_tuple(hidden, prep, taps))
        return out if prep.request.return_dict else out.to_tuple()

    def window_mask(self, layer: int, prep: Prepared):
        if layer in set(self.tower.fullatt_block_indexes):
            return None
        wid = prep.layout.window_ids(prep.hidden.device)

        def mask(q_pos, kv_pos):  # (B, 1, Lq, Lkv): query and key in the same window
            return (wid[q_pos].unsqueeze(-1) == wid[kv_pos].unsqueeze(-2)).unsqueeze(1)

        return mask


@register_adapter
class Qwen3_5Adapter(QwenVisionAdapter):
    name = "qwen3_5"
    tower_classes = ("transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5VisionModel",)
    title = "Qwen3.5's vision tower"

    def stack_rows(self, hidden_states, grid_thw, pos, kwargs):
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        t = self.tower
        idx, w = get_vision_interpolation_indices_and_weights(
            grid_thw, num_grid_per_side=t.num_grid_per_side, mode=t.interpolation_mode,
            align_corners=t.interpolation_align_corners, spatial_merge_size=t.config.spatial_merge_size, kwargs=kwargs)
        ctx = {"interp_indices": idx, "interp_weights": w}
        x = self.embed(hidden_states, ctx)
        cos, sin = t.rotary_pos_emb(x, pos)
        return x, cos, sin, ctx

    def embed(self, pixel_values: torch.Tensor, context=None) -> torch.Tensor:
        """Patch embedding + the learned position embedding resampled to the grid."""
        t = self.tower
        x = t.patch_embed(pixel_values)
        pos_embeds = (t.pos_embed(context["interp_indices"]) * context["interp_weights"][:, :, None]).sum(1)
        return (x + pos_embeds.to(x.dtype)).reshape(x.shape[0], -1)


@register_adapter
class Qwen3VLAdapter(Qwen3_5Adapter):
    name = "qwen3_vl"
    tower_classes = ("transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel",)
    title = "Qwen3-VL's vision tower"

    @property
    def tower_taps(self) -> Tuple[int, ...]:
        return tuple(self.tower.deepstack_visual_indexes)

    def finish(self, hidden: torch.Tensor, prep: Prepared, taps=None):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        t = self.tower
        deepstack: List[torch.Tensor] = [t.deepstack_merger_list[j](taps[i]) for j, i in enumerate(t.deepstack_visual_indexes)]
        out = BaseModelOutputWithDeepstackFeatures(
            last_hidden_state=hidden, pooler_output=t.merger(hidden), deepstack_features=deepstack,
            hidden_states=self.hidden_states_tuple(hidden, prep, taps))
        return out if prep.request.return_dict else out.to_tuple()
