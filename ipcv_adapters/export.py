"""Whole rewritten towers as exportable modules: ``TowerForExport(ipcv_compile.rewrite(tower, ...))``
runs the adapter's ``prepare`` -> the rewritten block stack -> ``finish`` and returns plain tensors,
so :func:`ipcv_compile.lower` can export the whole tower (ONNX, pt2, TensorRT, inductor)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .tower import IPCVTower

__all__ = ["TowerForExport"]


class TowerForExport(nn.Module):
    """A whole rewritten tower as an exportable module returning plain tensors.

    ``forward(pixel_values)`` runs ``adapter.prepare`` -> the rewritten block stack for the call's
    layout -> ``adapter.finish`` and returns ``(last_hidden_state, pooler_output)`` (the non-None
    ones, as a tuple).

    Batched towers (one image / tile per batch row): everything is traced; batch and image size stay
    dynamic when exported at a size other than the checkpoint's native one (the position-embedding
    interpolation branch specialises the native size; ``Lowered.dynamic_dims`` tells).

    Packed towers (several images in one sequence): ``prepare`` is data-dependent on the layout
    arguments (segment lengths, rotary positions), and the rewritten graph bakes each segment's keep
    count, so the module is built for one fixed layout (``fixed_kwargs``, e.g. ``grid_thw``): the
    side inputs (rotary cos/sin) are computed once here and stored as buffers, and the adapter's
    ``embed`` (the pixel-dependent part of ``prepare``; ``embed=`` overrides it) runs in the graph.
    One file per layout: export it with static shapes (``dynamic=False``).

    ``vanilla=True``: the same tower without pruning — the rewrite at retain 1.0 of the same capture
    (for packed towers: attention within each image / frame only, no IPCV op) — the baseline for
    benchmarks of every backend.
    """

    def __init__(self, tower: nn.Module, example: Sequence[Any] = (), fixed_kwargs: Optional[Dict[str, Any]] = None,
                 embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None, vanilla: bool = False):
        super().__init__()
        if not isinstance(tower, IPCVTower):
            raise TypeError(f"TowerForExport expects an ipcv_adapters.IPCVTower, got {type(tower).__name__}")
        self.tower = tower.with_config(retain=1.0) if vanilla else tower
        self.fixed_kwargs = dict(fixed_kwargs or {})
        self.packed = bool(tower.adapter.packed)
        self._template = None
        if self.packed:
            self.embed = embed or (lambda t, px: self.tower.adapter.embed(px))
            with torch.no_grad():
                prep = self.tower.adapter.prepare(*example, **self.fixed_kwargs)
            self._template = prep
            for i, s in enumerate(prep.side):
                self.register_buffer(f"side_{i}", s, persistent=False)
            self.rewritten = self.tower.graph_for(prep.layout)

    def forward(self, pixel_values: torch.Tensor):
        ad = self.tower.adapter
        if self.packed:
            from dataclasses import replace

            side = tuple(getattr(self, f"side_{i}") for i in range(len(self._template.side)))
            prep = replace(self._template, hidden=self.embed(self.tower.tower, pixel_values), side=side)
            hidden = self.rewritten(*prep.stack_inputs)
        else:
            prep = ad.prepare(pixel_values, **self.fixed_kwargs)
            hidden = self.tower.graph_for(prep.layout)(*prep.stack_inputs)
        out = ad.finish(hidden, prep)
        if isinstance(out, tuple):
            return tuple(t for t in out if isinstance(t, torch.Tensor))
        return tuple(t for t in (out.last_hidden_state, getattr(out, "pooler_output", None)) if t is not None)
