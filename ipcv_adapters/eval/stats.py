"""Per-sample cost records of ``generate()`` on a (compressed) transformers VLM: the columns of the paper's
Table 4, from the project's one cost model (:mod:`ipcv_core.cost`) and from what the run really held.

:class:`CostMeter` puts a forward pre-hook and a forward hook on the VLM (``...ForConditionalGeneration``).
Every ``generate`` starts with a *prefill* forward (empty cache); for it the meter records, per batch row:

* ViT (Qwen family: one IPCV segment per frame of ``h·w`` patches; ``vit_grids``: ``[kind, t, h, w]`` of every
  image / video the tower encoded for the sample; towers over a batch of tiles — InternVL, LLaVA-OneVision — one
  segment per tile, ``["tile", 1, h, w]``, recorded at batch size 1 only: the wrappers of those families run
  batch 1, and at batch > 1 which row a tile belongs to is not known, so the ViT fields are left out):
  ``vit_patches``, ``vit_patches_kept`` (patches, protected tokens such as CLS not counted; the rows the pruned blocks run on: the final
  stage's ``K = ceil(r·n)`` per segment; IPCV reintegrates the rest, so the merger and the LLM still get
  every token), ``vit_flops`` / ``vit_flops_vanilla`` — :func:`~ipcv_core.cost.config_flops` of the tower's
  block stack under its resolved configuration / unchanged (patch embedding and merger are the same for
  every method and not included);
* LLM: ``llm_prompt_tokens`` (unpadded), ``llm_visual_tokens``, ``llm_visual_tokens_kept`` (the cost model:
  ``ceil(r·n)`` per span from decoder layer K on) and ``llm_visual_tokens_kept_measured`` (read from the
  pruned cache), ``llm_prefill_flops`` / ``llm_prefill_flops_vanilla`` (:func:`~ipcv_core.cost.llm_prefill_flops`,
  LM head on the last row), ``kv_cache_bytes`` (:func:`~ipcv_core.cost.kv_cache_bytes` of the cost model's rows
  per layer after the prefill, at the cache's element size) and ``kv_cache_bytes_measured`` (of the rows the
  cache holds for this sample), ``kv_cache_bytes_allocated`` (the cache tensors' bytes after the prefill / the
  batch size: includes padding when rows differ in length);
* ``prefill_s``: wall-clock seconds of the prefill forward (ViT + LLM; CUDA synchronised), of the whole
  batch, with ``batch``; ``decode_steps`` and ``llm_decode_flops`` (:func:`~ipcv_core.cost.llm_decode_flops`
  over the decoding forwards that followed).

The meter keeps its records on itself (not on a module); :meth:`take` hands them over and clears them.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ipcv_core.config import num_keep
from ipcv_core.cost import LLMDims, ModelDims, config_flops, kv_cache_bytes, llm_decode_flops, llm_prefill_flops
from ipcv_core.llm_prune import span_budget

__all__ = ["CostMeter", "llm_dims", "tower_dims", "summarize"]


def llm_dims(text_config) -> LLMDims:
    """The cost model's sizes of a decoder config (Qwen2 / Qwen3 style: SwiGLU FFN)."""
    c = text_config
    heads = int(c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or int(c.hidden_size) // heads
    return LLMDims(hidden=int(c.hidden_size), intermediate=int(c.intermediate_size), layers=int(c.num_hidden_layers),
                   heads=heads, kv_heads=int(getattr(c, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                   vocab=int(c.vocab_size), gated=True)


def tower_dims(adapter, tower: nn.Module) -> ModelDims:
    """The cost model's sizes of a tower's blocks (as ``ipcv tune`` prices them: FFN weight entries read off
    the first block, matching metric the head dim)."""
    cfg = tower.config
    width = int(getattr(cfg, "embed_dim", None) or cfg.hidden_size)
    heads = getattr(cfg, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    ffn = adapter.blocks[0].get_submodule(adapter.spec.ffn)
    return ModelDims(width, ffn_params=sum(p.numel() for p in ffn.parameters()),
                     key_dim=width // int(heads) if heads else None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CostMeter:
    """Records one cost record per generated sample of ``model`` (see the module doc); :meth:`remove` takes
    the hooks off again.  ``model`` may or may not carry :func:`ipcv_adapters.compress`'s installation."""

    def __init__(self, model: nn.Module) -> None:
        from ..llm.families import UnsupportedVLMError, find_family
        from ..llm.install import _get_path, find_tower_path, installed
        from ..registry import find_adapter
        from ..tower import IPCVTower

        self.model = model
        try:
            self.family = find_family(model)
        except UnsupportedVLMError:
            self.family = None
        self.dims = llm_dims(model.config.get_text_config(decoder=True))
        inst = installed(model)
        self.llm_method = inst.settings.method if inst is not None else None
        self.llm_retain = inst.settings.retain if inst is not None else 1.0
        self.llm_layer = inst.settings.layer if inst is not None else 0
        self.vit_config = None
        self.adapter = None
        self.vit_dims = None
        try:
            tower = _get_path(model, find_tower_path(model, self.family))
        except Exception:
            tower = None
        if isinstance(tower, IPCVTower):
            self.adapter, self.vit_config, base = tower.adapter, tower.ipcv_config, tower.tower
        elif tower is not None:
            try:
                self.adapter, base = find_adapter(tower), tower
            except Exception:
                self.adapter = base = None
        self.patch = None
        if self.adapter is not None:
            self.vit_dims = tower_dims(self.adapter, base)
            self.depth = self.adapter.depth
            p = getattr(base.config, "patch_size", None)
            self.patch = (int(p), int(p)) if isinstance(p, int) else tuple(int(v) for v in p) if p else None
        vcfg = getattr(model.config, "vision_config", None)
        self.merge = int(getattr(vcfg, "spatial_merge_size", 1) or 1)
        self.records: List[Dict[str, Any]] = []
        self._open: Optional[List[Dict[str, Any]]] = None    # the records of the generate() now running
        self._prefill: Optional[Dict[str, Any]] = None
        self._vision: List[Dict[str, Any]] = []              # tower calls not yet given to a prefill
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]
        if tower is not None:  # transformers 5.2x's generate() encodes the media before the prefill forward
            self._handles += [tower.register_forward_pre_hook(self._tower_pre, with_kwargs=True),
                              tower.register_forward_hook(self._tower_post, with_kwargs=True)]

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> List[Dict[str, Any]]:
        """The records since the last call (the generate() now finished included), cleared."""
        self._close()
        out, self.records = self.records, []
        return out

    def _close(self) -> None:
        if self._open is not None:
            for rec, rows in ((r, r.pop("_rows")) for r in self._open):
                rec["llm_decode_flops"] = llm_decode_flops(rows, rec["decode_steps"], self.dims)
            self.records.extend(self._open)
            self._open = None

    def _tower_pre(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        _sync(device)
        if isinstance(grid, torch.Tensor):  # the Qwen family: packed patches, one (t, h, w) per image / video
            grids, kind = [tuple(int(v) for v in g) for g in grid.tolist()], None
        elif isinstance(x, torch.Tensor) and x.dim() == 4 and self.patch:  # a batch of images / tiles (B, C, H, W)
            grids, kind = [(1, x.shape[2] // self.patch[0], x.shape[3] // self.patch[1])] * x.shape[0], "tile"
        else:
            grids, kind = None, None
        self._vision.append({"grids": grids, "kind": kind, "t0": time.perf_counter(), "device": device, "seconds": 0.0})
        return None

    def _tower_post(self, module, args, kwargs, output):
        if self._vision:
            call = self._vision[-1]
            _sync(call["device"])
            call["seconds"] = time.perf_counter() - call["t0"]
        return None

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.2x: "cache"
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache is not None and cache.get_seq_length() > 0:  # a decoding step of the open call
            if self._open is not None:
                for rec in self._open:
                    rec["decode_steps"] += 1
            return None
        self._close()
        if ids is None or ids.dim() != 2:
            return None
        device = ids.device
        _sync(device)
        self._prefill = {"kwargs": kwargs, "ids": ids, "t0": time.perf_counter(), "device": device}
        return None

    def _post(self, module, args, kwargs, output):
        p, self._prefill = self._prefill, None
        if p is None:
            return None
        _sync(p["device"])
        seconds = time.perf_counter() - p["t0"]
        vision, self._vision = self._vision, []
        vit_s = sum(c["seconds"] for c in vision)
        llm_s = seconds - sum(c["seconds"] for c in vision if c["t0"] >= p["t0"])  # tower calls inside the forward
        cache = getattr(output, "cache", None)
        cache = cache if cache is not None else getattr(output, "past_key_values", None)
        self._open = self._records(p["kwargs"], p["ids"], cache, vision, vit_s, llm_s)
        return None

    # ------------------------------------------------------------------ the records
    def _records(self, kwargs, ids: torch.Tensor, cache, vision, vit_s: float, llm_s: float) -> List[Dict[str, Any]]:
        B, L = ids.shape
        mask = kwargs.get("attention_mask")
        mask = mask.to(ids.device).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else \
            torch.ones_like(ids, dtype=torch.bool)
        lengths = mask.sum(dim=1).tolist()
        layers, K = self.dims.layers, self.llm_layer
        spans = self._spans(kwargs, ids, mask)
        vit = self._vit_rows(vision, ids, mask)
        state = getattr(cache, "prune_state", None)
        measured_kept = None
        if state is not None and state.keep_index is not None:
            valid = state.keep_valid & torch.gather(mask, 1, state.keep_index)
            measured_kept = valid.sum(dim=1).tolist()
        elem = 2
        allocated = 0.0
        if cache is not None and getattr(cache, "layers", None):
            for lay in cache.layers:
                k, v = getattr(lay, "keys", None), getattr(lay, "values", None)
                if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
                    elem = k.element_size()
                    allocated += (k.numel() + v.numel()) * k.element_size()
        out = []
        for r in range(B):
            Lr = int(lengths[r])
            n_vis = sum(n for _, n in spans[r])
            if self.llm_method is not None:
                kept_vis = sum(span_budget(n, self.llm_retain) for _, n in spans[r])
                rows = [Lr] * K + [Lr - n_vis + kept_vis] * (layers - K)
            else:
                kept_vis = n_vis
                rows = [Lr] * layers
            if measured_kept is not None:
                m_rows = [Lr] * K + [int(measured_kept[r])] * (layers - K)
            else:
                m_rows = [Lr] * layers
            rec = {
                "batch": B, "prefill_s": vit_s + llm_s, "vit_s": vit_s, "llm_prefill_s": llm_s, "decode_steps": 0,
                "llm_prompt_tokens": Lr, "llm_visual_tokens": n_vis, "llm_visual_tokens_kept": kept_vis,
                "llm_visual_tokens_kept_measured": m_rows[-1] - (Lr - n_vis),
                "llm_prefill_flops": llm_prefill_flops(rows, self.dims),
                "llm_prefill_flops_vanilla": llm_prefill_flops([Lr] * layers, self.dims),
                "kv_cache_bytes": kv_cache_bytes(rows, self.dims, elem),
                "kv_cache_bytes_measured": kv_cache_bytes(m_rows, self.dims, elem),
                "kv_cache_bytes_allocated": allocated / B,
                "_rows": m_rows,
            }
            rec.update(vit[r])
            out.append(rec)
        return out

    def _spans(self, kwargs, ids, mask) -> List[List[tuple]]:
        """Per row, the visual spans LLM-side pruning sees (the last prompt token, always kept, excluded)."""
        if self.family is None:
            return [[] for _ in range(ids.shape[0])]
        spans = self.family.spans({**kwargs, "input_ids": ids, "attention_mask": mask})
        L = ids.shape[1]
        ar = torch.arange(L, device=ids.device).expand_as(ids)
        last = torch.where(mask, ar, -1).amax(dim=1).tolist()
        return [[(s, n - 1) if s + n - 1 == last[r] else (s, n) for s, n in row] for r, row in enumerate(spans)]

    def _vit_rows(self, vision, ids, mask) -> List[Dict[str, Any]]:
        """ViT records per row.  The tower calls of this prefill (images first, then videos, as the Qwen models
        and ``generate`` encode them) give the grids in row order; each row takes the grids whose LLM tokens
        (``t·h·w / merge²``) add up to its image (video) tokens."""
        B = ids.shape[0]
        if self.vit_dims is None or not vision:
            return [{} for _ in range(B)]
        cfg = self.model.config
        counts = {}
        for kind in ("image", "video"):
            tok = getattr(cfg, kind + "_token_id", None)
            counts[kind] = [int(((ids[r] == tok) & mask[r]).sum()) if tok is not None else 0 for r in range(B)]
        per_row = [dict(vit_grids=[], vit_patches=0, vit_patches_kept=0, vit_flops=0.0, vit_flops_vanilla=0.0)
                   for _ in range(B)]
        tiles = [g for c in vision if c["kind"] == "tile" for g in c["grids"]]
        if tiles:  # towers over a batch of tiles: which row a tile belongs to is known for one row only
            if B != 1:
                return [{} for _ in range(B)]
            for t, h, w in tiles:
                per_row[0]["vit_grids"].append(["tile", t, h, w])
                self._add_segments(per_row[0], t, h * w)
            return per_row
        calls = [c["grids"] for c in vision if c["grids"]]
        kinds = []
        for grids in calls:
            n = sum(t * h * w for t, h, w in grids) // self.merge ** 2
            kinds.append("image" if "image" not in kinds and n == sum(counts["image"]) and n > 0 else "video")
        for kind, grids in zip(kinds, calls):
            queue = list(grids)
            for r in range(B):
                need = counts[kind][r]
                while need > 0 and queue:
                    t, h, w = queue.pop(0)
                    need -= t * h * w // self.merge ** 2
                    per_row[r]["vit_grids"].append([kind, t, h, w])
                    self._add_segments(per_row[r], t, h * w)
        return per_row

    def _add_segments(self, rec: Dict[str, Any], frames: int, patches: int) -> None:
        """``frames`` segments of ``patches`` patches each (plus the tower's protected tokens, e.g. CLS)."""
        cfg, prot = self.vit_config, self.adapter.protected
        kept = num_keep(patches, cfg.retain, cfg.min_keep) if cfg is not None else patches
        rec["vit_patches"] += frames * patches
        rec["vit_patches_kept"] += frames * kept
        rec["vit_flops"] += frames * config_flops(cfg, patches + prot, prot, self.depth, self.vit_dims)
        rec["vit_flops_vanilla"] += frames * config_flops(None, patches + prot, prot, self.depth, self.vit_dims)


_SUMMED = ("vit_patches", "vit_patches_kept", "vit_flops", "vit_flops_vanilla", "llm_prompt_tokens", "llm_visual_tokens",
           "llm_visual_tokens_kept", "llm_visual_tokens_kept_measured", "llm_prefill_flops", "llm_prefill_flops_vanilla",
           "llm_decode_flops", "kv_cache_bytes", "kv_cache_bytes_measured", "kv_cache_bytes_allocated")


def summarize(records: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Per-sample means of every field, the ratios to vanilla, and the mean prefill latency per batch and per
    sample (``prefill_s_per_sample``: a batch's prefill time / its size)."""
    if not records:
        return {}
    n = len(records)
    out: Dict[str, float] = {"samples": float(n)}
    for k in _SUMMED:
        vals = [r[k] for r in records if k in r]
        if vals:
            out[k] = float(sum(vals)) / len(vals)
    if out.get("vit_flops_vanilla"):
        out["vit_flops_ratio"] = out["vit_flops"] / out["vit_flops_vanilla"]
    if out.get("llm_prefill_flops_vanilla"):
        out["llm_prefill_flops_ratio"] = out["llm_prefill_flops"] / out["llm_prefill_flops_vanilla"]
    total = out.get("vit_flops", 0.0) + out.get("llm_prefill_flops", 0.0)
    total_van = out.get("vit_flops_vanilla", 0.0) + out.get("llm_prefill_flops_vanilla", 0.0)
    out["prefill_flops"] = total
    if total_van:
        out["prefill_flops_ratio"] = total / total_van
    out["prefill_s_per_sample"] = sum(r["prefill_s"] / r["batch"] for r in records) / n
    batches = {}
    for r in records:  # one latency per batch: records of a batch share it
        batches.setdefault((r["prefill_s"], r["batch"]), r["prefill_s"])
    out["prefill_s_per_batch"] = sum(batches.values()) / len(batches)
    return out
