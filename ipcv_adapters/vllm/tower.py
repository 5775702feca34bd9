"""IPCV inside vLLM's own Qwen vision towers (``Qwen2VisionTransformer``, ``Qwen2_5_VisionTransformer``,
``Qwen3_VisionTransformer``), through the eager driver :func:`ipcv_core.run_ipcv`.

Why the driver and not a graph rewrite: vLLM's towers run its parallel linear layers (sharded under
tensor parallelism, all-reduced in ``RowParallelLinear``), its attention backends (``MMEncoderAttention``:
FlashAttention / FlashInfer / Triton / torch SDPA, chosen per platform) and its fused rotary and norm
kernels, most of which ``torch.export`` cannot capture. The driver needs per block only an attention
branch and an FFN branch, so every block here runs vLLM's own modules on whatever rows IPCV asks for:

* **self-attention over the current rows** (blocks before ``l_p``, after the AS range): vLLM's
  ``blk.attn`` with ``cu_seqlens`` / ``max_seqlen`` / FlashInfer ``sequence_lengths`` recomputed for
  the kept rows of each frame (and, in Qwen2.5-VL's windowed blocks, of each window) with vLLM's own
  helpers, and the rotary ``cos`` / ``sin`` tables gathered at the kept rows' original positions;
* **AS blocks** (``[l_p, l_p+Δ)``): vLLM's fused ``qkv`` projection over every row of the frame
  (kept rows and the NGR-reconstructed removed rows; split per head by the tower's own layout, so
  tensor-parallel shards stay the rank's heads), rotary from vLLM's ``apply_rotary_emb`` at each
  row's position, then the queries of the kept rows only attend over all rows of their frame (and
  window, in Qwen2.5-VL's windowed blocks): ``K_i x n_i`` per frame through
  :func:`ipcv_core.attention.segment_attention` (torch SDPA, frames of equal sizes batched) —
  vLLM's encoder attention takes one ``cu_seqlens`` for queries and keys, so it cannot run this
  shape — and vLLM's output projection (``RowParallelLinear``) on the kept rows;
* **FFN**: ``blk.mlp(blk.norm2(x))`` on the kept rows.

Selection, neighbours, NGR and reintegration are ``ipcv_core``'s (per frame: one segment per frame of
each image / video; nothing crosses segments). After the last block the sequence is full length in
the tower's row order again, so the merger, deepstack mergers and Qwen2.5-VL's ``reverse_indices`` run
unchanged and the output has exactly vLLM's row count.

Tensor parallelism: the hidden states between blocks are replicated on every rank (the output of
``RowParallelLinear``'s all-reduce, then replicated norms and residual adds), and every step of the
selection and the neighbour search is a deterministic function of them (top-k with ties to the
lower index, no randomness: the ``random`` variants hash token indices), so every rank selects the
same rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ipcv_core.attention import segment_attention
from ipcv_core.config import IPCVConfig
from ipcv_core.driver import AttnContext, Branches, run_ipcv
from ipcv_core.schedule import Schedule
from ipcv_core.segments import SegmentLayout

__all__ = ["VisionFamily", "FAMILIES", "check_config", "ipcv_forward", "rows_metadata"]


# ---------------------------------------------------------------------------------------- metadata
def _cu(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([np.zeros(1, dtype=np.int32), np.cumsum(np.asarray(lengths, dtype=np.int32), dtype=np.int32)])


def _varlen_metadata(tower, lengths: Sequence[int], device) -> Dict[str, Any]:
    """``cu_seqlens`` / ``max_seqlen`` / ``sequence_lengths`` of packed sequences of ``lengths`` rows,
    made by vLLM's own ``MMEncoderAttention`` helpers for the tower's backend (as the tower's
    ``prepare_encoder_metadata`` makes them for whole frames)."""
    from vllm.model_executor.layers.attention.mm_encoder_attention import MMEncoderAttention

    cu = _cu([n for n in lengths if n > 0])
    backend = tower.attn_backend
    return {
        "cu_seqlens": MMEncoderAttention.maybe_recompute_cu_seqlens(
            backend, cu, tower.hidden_size, tower.tp_size, device,
            fp8_padded_hidden_size=getattr(tower, "fp8_padded_hidden_size", None)),
        "max_seqlen": torch.tensor(MMEncoderAttention.compute_max_seqlen(backend, cu), dtype=torch.int32),
        "sequence_lengths": MMEncoderAttention.maybe_compute_seq_lens(backend, cu, device),
    }


def _qwen2_metadata(tower, lengths: Sequence[int], device) -> Dict[str, Any]:
    """Qwen2-VL's tower passes plain ``cu_seqlens`` (int32) and ``compute_attn_mask_seqlen``."""
    cu = torch.from_numpy(_cu([n for n in lengths if n > 0])).to(device)
    return {"cu_seqlens": cu, "max_seqlen": tower.compute_attn_mask_seqlen(cu)}


def rows_metadata(family: "VisionFamily", tower, lengths: Sequence[int], device) -> Dict[str, Any]:
    """The attention metadata of packed rows with per-sequence ``lengths`` (frames or windows)."""
    return (_qwen2_metadata if family.plain_cu_seqlens else _varlen_metadata)(tower, lengths, device)


# ---------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class VisionFamily:
    """What differs between vLLM's Qwen towers: how pixels become the rows entering block 0, which
    blocks attend within windows, what follows the blocks."""

    name: str
    #: Qwen2-VL's attention takes no ``sequence_lengths`` and plain ``cu_seqlens``
    plain_cu_seqlens: bool = False
    windows: bool = False
    deepstack: bool = False

    def embed(self, tower, x: torch.Tensor, meta: Dict[str, Any]) -> torch.Tensor:
        """Normalised, patch-embedded rows ``(N, D)`` in the order the blocks see them."""
        h = tower.patch_embed(tower.input_norm(x.to(device=tower.device), tower.dtype))
        if self.deepstack:  # Qwen3-VL: learned position embedding, resampled to each grid
            h = h + meta["pos_embeds"]
        if self.windows:  # Qwen2.5-VL: 2x2 merge units permuted into window order
            n, unit = h.shape[0], tower.spatial_merge_unit
            h = h.reshape(n // unit, unit, -1)[meta["window_index"]].reshape(n, -1)
        return h

    def frame_lengths(self, grid: Sequence[Sequence[int]]) -> List[int]:
        return [int(h) * int(w) for t, h, w in grid for _ in range(int(t))]

    def layout(self, tower, grid: Sequence[Sequence[int]]) -> SegmentLayout:
        """One segment per frame; Qwen2.5-VL's frames carry their attention windows, the others
        their patch grid in the 2x2 merge order (for the grid-aware variants)."""
        frames = self.frame_lengths(grid)
        if self.windows:
            from ipcv_adapters.qwen_family import frames_of_windows

            return SegmentLayout.packed(frames, windows=frames_of_windows(_window_lengths_of(grid, tower), frames))
        grids = [(int(h), int(w)) for t, h, w in grid for _ in range(int(t))]
        return SegmentLayout.packed(frames, 0, grids, int(tower.spatial_merge_size))

    def split_qkv(self, attn, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``blk.attn.qkv``'s output ``(L, 1, 3·H·hd)`` -> q, k, v ``(1, L, H, hd)`` of this rank's
        heads, as the tower's attention splits it (Qwen2-VL: gathered and re-split under TP)."""
        if self.plain_cu_seqlens:
            return tuple(t.transpose(0, 1) for t in attn.split_qkv(qkv))
        L = qkv.shape[0]
        q, k, v = qkv.view(L, 3, attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head).unbind(1)
        return q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)

    def full_attention(self, tower, layer: int) -> bool:
        return not self.windows or layer in tower.fullatt_block_indexes

    def block_kwargs(self, meta: Dict[str, Any], full: bool) -> Dict[str, Any]:
        """The tower's own keyword arguments of ``blk.attn`` for all rows."""
        if self.plain_cu_seqlens:
            return {"cu_seqlens": meta["cu_seqlens"], "max_seqlen": meta["max_seqlen"]}
        if self.windows:
            sfx = "full" if full else "window"
            return {"cu_seqlens": meta["cu_seqlens" if full else "cu_window_seqlens"],
                    "max_seqlen": meta[f"max_seqlen_{sfx}"], "sequence_lengths": meta.get(f"sequence_lengths_{sfx}")}
        return {"cu_seqlens": meta["cu_seqlens"], "max_seqlen": meta["max_seqlen"],
                "sequence_lengths": meta.get("sequence_lengths")}

    def finish(self, tower, h: torch.Tensor, taps: Dict[int, torch.Tensor], meta: Dict[str, Any]) -> torch.Tensor:
        """Rows after the last block ``(N, 1, D)`` -> the tower's output (merger and what follows)."""
        if self.windows:
            if h.dtype == torch.float16:
                from vllm.model_executor.models.qwen2_5_vl import cast_overflow_tensors

                h = cast_overflow_tensors(h)
            return tower.merger(h)[meta["reverse_indices"], :]
        out = tower.merger(h)
        if self.deepstack:
            feats = [tower.deepstack_merger_list[j](taps[i].transpose(0, 1))
                     for j, i in enumerate(tower.deepstack_visual_indexes)]
            out = torch.cat([out] + feats, dim=1)
        return out

    def taps(self, tower) -> Tuple[int, ...]:
        return tuple(tower.deepstack_visual_indexes) if self.deepstack else ()


FAMILIES = {
    "qwen2_vl": VisionFamily("qwen2_vl", plain_cu_seqlens=True),
    "qwen2_5_vl": VisionFamily("qwen2_5_vl", windows=True),
    "qwen3_vl": VisionFamily("qwen3_vl", deepstack=True),
}


def _window_lengths_of(grid, tower) -> List[int]:
    """Qwen2.5-VL's window lengths (rows) per call, from ``get_rope_by_thw`` (the tower's cache of
    per-grid window tables; ``cu_window_seqlens`` in the metadata may carry backend offsets)."""
    out: List[int] = []
    for t, h, w in grid:
        cu = tower.get_rope_by_thw(int(t), int(h), int(w))[3]  # cu_seqlens_window_thw, starting after 0
        cu = [0] + [int(v) for v in cu.tolist()]
        out += [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a]
    return out


# ---------------------------------------------------------------------------------------- forward
def _seq_first(x: torch.Tensor) -> torch.Tensor:
    """Driver rows ``(1, L, D)`` -> vLLM's sequence-first ``(L, 1, D)``."""
    return x.transpose(0, 1)


def ipcv_forward(tower, family: VisionFamily, config: IPCVConfig, x: torch.Tensor, grid_thw,
                 vanilla: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
    """vLLM tower ``forward(x, grid_thw)`` with IPCV (``config`` resolved for the tower's depth).
    ``vanilla(x, grid_thw)``: the tower's own forward, run when no stage removes a row for this
    layout (retain 1.0, or images too small to prune): the output is then vLLM's, bit for bit."""
    grid = grid_thw if isinstance(grid_thw, list) else grid_thw.tolist()
    grid = [[int(v) for v in g] for g in grid]
    layout = family.layout(tower, grid)
    n = layout.static_tokens
    if x.shape[0] != n:
        raise ValueError(f"grid_thw {grid} describes {n} patches but the pixel input has {x.shape[0]} rows")
    schedule = Schedule.build(config, len(tower.blocks))
    if schedule.keeps_all(layout, n):
        return vanilla(x, grid)
    meta = dict(tower.prepare_encoder_metadata(grid))
    h = family.embed(tower, x, meta)
    device = h.device
    wid = layout.window_ids(device) if layout.windows is not None else None
    cos, sin = meta["rotary_pos_emb_cos"], meta["rotary_pos_emb_sin"]
    kept_meta: Dict[Tuple[int, bool], Tuple[torch.Tensor, Dict[str, Any]]] = {}  # this call only

    def metadata_for(pos: Optional[torch.Tensor], q_lengths: Sequence[int], full: bool) -> Dict[str, Any]:
        """Block keyword arguments for the rows at ``pos`` (None = all rows, the tower's own)."""
        if pos is None:
            return dict(family.block_kwargs(meta, full), rotary_pos_emb_cos=cos, rotary_pos_emb_sin=sin)
        hit = kept_meta.get((id(pos), full))
        if hit is not None and hit[0] is pos:
            return hit[1]
        p = pos[0]
        if full:
            lengths = list(q_lengths)
        else:  # kept rows of every window (kept rows stay in ascending order: windows stay contiguous)
            lengths = torch.bincount(wid[p], minlength=int(wid[-1]) + 1).tolist()
        kw = dict(rows_metadata(family, tower, lengths, device), rotary_pos_emb_cos=cos[p], rotary_pos_emb_sin=sin[p])
        if family.plain_cu_seqlens:
            kw.pop("sequence_lengths", None)
        kept_meta[(id(pos), full)] = (pos, kw)
        return kw

    def attention(layer: int, blk, x_q, x_kv, ctx: AttnContext, q_lengths, kv_lengths):
        full = family.full_attention(tower, layer)
        if ctx.q_in_kv is not None:  # AS: the kept rows' queries over every row of their frame
            return stabilised_attention(blk, x_kv, ctx, q_lengths, kv_lengths, full)
        upd = blk.attn(blk.norm1(_seq_first(x_q)), **metadata_for(ctx.q_pos, q_lengths, full))
        return upd.transpose(0, 1)

    def rows(table, pos):
        return table if pos is None else table[pos[0]]

    def stabilised_attention(blk, x_kv, ctx: AttnContext, q_lengths, kv_lengths, full):
        a = blk.attn
        qkv, _ = a.qkv(blk.norm1(_seq_first(x_kv)))
        q, k, v = family.split_qkv(a, qkv)
        q = q[:, ctx.q_in_kv[0]]
        q = a.apply_rotary_emb(q.contiguous(), rows(cos, ctx.q_pos), rows(sin, ctx.q_pos))
        k = a.apply_rotary_emb(k.contiguous(), rows(cos, ctx.kv_pos), rows(sin, ctx.kv_pos))
        groups = {}
        if not full:  # a windowed block: a query attends to the keys of its own window
            groups = dict(q_groups=wid[ctx.q_pos[0]], kv_groups=wid if ctx.kv_pos is None else wid[ctx.kv_pos[0]])
        o = segment_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q_lengths=q_lengths,
                              kv_lengths=kv_lengths, scale=a.attn.scale, **groups)  # (1, H, K, hd)
        out, _ = a.proj(o.permute(2, 0, 1, 3).reshape(o.shape[2], 1, -1))
        return out.transpose(0, 1)

    def ffn(blk, x):
        return blk.mlp(blk.norm2(_seq_first(x))).transpose(0, 1)

    blocks = [Branches(attention=_per_segment_unused, ffn=functools.partial(ffn, blk),
                       segments=functools.partial(attention, i, blk))
              for i, blk in enumerate(tower.blocks)]
    out = run_ipcv(h.unsqueeze(0), blocks, schedule, layout, taps=family.taps(tower))
    return family.finish(tower, _seq_first(out.hidden_states), out.taps, meta)


def _per_segment_unused(x_q, x_kv, ctx):  # the driver calls ``segments`` for packed layouts
    raise RuntimeError("vLLM tower blocks attend through Branches.segments")


def check_config(config: IPCVConfig) -> None:
    """Refuse the variants this integration cannot run (ValueError naming the field): rules that
    match on the attention keys, and proportional attention (a logit bias vLLM's attention backends
    do not take)."""
    if config.needs_key_metric:
        raise ValueError(f"IPCVConfig.selection={config.selection!r} matches on the attention keys, which vLLM's "
                         "attention backends do not return; under vLLM use a selection that needs no keys "
                         "(score, random, stratified, stratified_random)")
    if config.merge_rule.attention_bias:
        raise ValueError(f"IPCVConfig.merge={config.merge!r} adds log(size) to the attention logits, which vLLM's "
                         "attention backends do not take; under vLLM use merge='none' or 'average_plain'")
