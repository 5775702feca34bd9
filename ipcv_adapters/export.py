"""Whole rewritten towers as exportable modules: ``TowerForExport(ipcv_compile.rewrite(tower, ...))``
runs the adapter's ``prepare`` -> the rewritten block stack -> ``finish`` and returns plain tensors,
so :func:`ipcv_compile.lower` can export the whole tower (ONNX, pt2, TensorRT, inductor).

What a file holds and what it serves is decided here and written into the file itself
(:meth:`TowerForExport.ipcv_metadata`, read back by :func:`ipcv_compile.backends.artifacts.load_artifact`):

* **batched towers** (one image / tile per batch row): the batch is dynamic; the image size is
  dynamic when the tower accepts other sizes (checked on an image one patch larger: DINOv2 and
  InternVL interpolate their position table; SigLIP / CLIP only with
  ``interpolate_pos_encoding=True``), else static — honestly, in the file and in ``dynamic_dims``.
  At export, HF's "always interpolate when tracing" path is taken (the embedding runs on a view of
  the tower whose ``interpolate_pos_encoding`` reads ``torch.jit.is_tracing()`` as True; nothing
  is patched), so a file exported at the native size serves other sizes and a
  file exported at another size serves the native one.  Grid-aware IPCV variants need the patch
  grid, so their file is for the example's image size (static).
* **packed towers** (Qwen2-VL: several images / frames in one sequence, per-segment keep counts
  baked in): one file per layout (``fixed_kwargs={"grid_thw": ...}``).  The file takes the layout
  as an input, ``(pixel_values, grid_thw)`` as the transformers tower does, and checks it inside
  the graph (:class:`LayoutCheck`): another ``grid_thw`` fails the call in any runtime — a bare
  onnxruntime session or ``torch.export.load(path).module()`` included — instead of returning
  wrong numbers.  The layout is also recorded in the file's metadata, and the project's loader
  refuses another layout before running the graph, naming both.
"""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ipcv_core.segments import SegmentLayout

from .base import TowerAdapter, module_view
from .tower import IPCVTower

__all__ = ["TowerForExport", "LayoutCheck", "OUTPUT_NAMES", "METADATA_KEY", "LAYOUT_CHECK_SCOPE"]

OUTPUT_NAMES = ("last_hidden_state", "pooler_output")
METADATA_KEY = "ipcv"  # key of the JSON metadata in the ONNX file / the pt2 extra file "ipcv.json"

# HF's position-embedding interpolation (``interpolate_pos_encoding`` of the DINOv2 / InternVL /
# SigLIP / CLIP embeddings) returns the table as it is at the native size unless
# ``torch.jit.is_tracing()`` ("always interpolate when tracing to ensure the exported model works for
# dynamic input shapes"); torch.export does not set it.  While TowerForExport's embedding is
# exported, ``prepare`` runs on a *view* of the tower (:func:`_interpolating_adapter`: the same
# tensors, registries of its own) whose embeddings call HF's own function as it runs under
# ``torch.jit.trace`` — identical numbers at the native size (bicubic resampling onto the same grid).
# Nothing is patched: torch, the HF modules and the user's tower are unchanged for every other
# caller and thread.
class _Namespace:
    """``base`` (a module) with some attributes answered otherwise; read-only."""

    def __init__(self, base: Any, **overrides: Any):
        self._base, self._overrides = base, overrides

    def __getattr__(self, name: str) -> Any:
        return self._overrides[name] if name in self._overrides else getattr(self._base, name)


_TRACED_TORCH = _Namespace(torch, jit=_Namespace(torch.jit, is_tracing=lambda: True))


@functools.lru_cache(maxsize=None)
def _as_when_traced(fn: types.FunctionType) -> types.FunctionType:
    """HF's ``fn`` as it runs under ``torch.jit.trace``: the same code object, whose globals (a copy
    of its module's) see ``torch`` as a namespace answering ``torch.jit.is_tracing()`` with True."""
    f = types.FunctionType(fn.__code__, {**fn.__globals__, "torch": _TRACED_TORCH}, fn.__name__, fn.__defaults__,
                           fn.__closure__)
    f.__kwdefaults__ = fn.__kwdefaults__
    return f


def _reads_is_tracing(fn: Any) -> bool:
    return isinstance(fn, types.FunctionType) and "is_tracing" in fn.__code__.co_names


def _interpolating_view(module: nn.Module) -> nn.Module:
    """``module`` itself when nothing under it has HF's ``interpolate_pos_encoding``, else a
    :func:`~ipcv_adapters.base.module_view` in which those modules interpolate as when traced."""
    children = {}
    for name, child in module._modules.items():
        if child is not None:
            view = _interpolating_view(child)
            if view is not child:
                children[name] = view
    fn = getattr(type(module), "interpolate_pos_encoding", None)
    if not _reads_is_tracing(fn) and not children:
        return module
    view = module_view(module, children)
    if _reads_is_tracing(fn):
        object.__setattr__(view, "interpolate_pos_encoding", types.MethodType(_as_when_traced(fn), view))
    return view


def _interpolating_adapter(adapter: TowerAdapter) -> TowerAdapter:
    """A copy of ``adapter`` whose tower is :func:`_interpolating_view` of its tower (built per
    export: the view holds the tower's tensors as they are now)."""
    view = copy.copy(adapter)
    view.tower = _interpolating_view(adapter.tower)
    return view


#: the submodule name of the in-graph layout check (the onnx backend names its failing node after it)
LAYOUT_CHECK_SCOPE = "ipcv_layout_check"


class LayoutCheck(nn.Module):
    """The in-graph check of a packed file's layout: ``forward(pixel_values, grid_thw)`` returns
    ``pixel_values`` unchanged when ``grid_thw`` equals the layout the file was built for, and fails
    otherwise — in every runtime, since ONNX has no assert op:

    * ``torch._assert_async`` raises ``RuntimeError`` with :attr:`message` (eager, ``torch.export``
      programs / ``.pt2`` files, inductor); the ONNX exporter drops it, so
    * an index into a one-element table that is out of range exactly when the layout differs:
      onnxruntime fails the ``GatherND`` node (``INVALID_ARGUMENT``), which the onnx backend names
      ``ipcv_layout_check: <message>`` so the error says why; and
    * NaN added on a mismatch, so a runtime that does not bounds-check indices (some GPU execution
      providers may not) returns NaN outputs — the documented mismatch signal — never wrong numbers.

    A ``grid_thw`` of another shape (another number of images / videos) is refused by the file's
    static input shape.  On a match the cost is a few ops on ``grid_thw`` and one multiply by 1.0."""

    def __init__(self, grid_thw: torch.Tensor):
        super().__init__()
        want = grid_thw.detach().to(torch.int64)
        self.register_buffer("want", want, persistent=False)
        self.message = (f"grid_thw is not {want.tolist()}, the layout this file was exported for (a packed "
                        "file serves one layout: export one file per grid_thw)")

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if grid_thw.shape != self.want.shape:
            raise ValueError(f"grid_thw of shape {list(grid_thw.shape)}: {self.message}")
        bad = (grid_thw.to(torch.int64) != self.want.to(grid_thw.device)).any()
        torch._assert_async(~bad, self.message)
        one = torch.ones(1, dtype=pixel_values.dtype, device=pixel_values.device)
        scale = one[bad.to(torch.int64).reshape(1)]  # out of range on a mismatch: onnxruntime fails here
        scale = scale + torch.where(bad, float("nan"), 0.0).to(pixel_values.dtype)
        return pixel_values * scale


def _to_json(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    return v


def _flat_outputs(out) -> Tuple[torch.Tensor, ...]:
    """``(last_hidden_state, pooler_output, *deepstack_features)``, the non-None ones: what a file
    returns (Qwen3-VL's deepstack features feed the language model, so they are outputs too)."""
    if isinstance(out, tuple):  # return_dict=False: the same fields in order, lists flattened
        items = [x for x in out if x is not None]
        flat = [x for it in items[:3] for x in (it if isinstance(it, (list, tuple)) else (it,))]
        return tuple(x for x in flat if isinstance(x, torch.Tensor))
    deep = getattr(out, "deepstack_features", None) or ()
    return tuple(x for x in (out.last_hidden_state, getattr(out, "pooler_output", None), *deep) if x is not None)


class TowerForExport(nn.Module):
    """A whole rewritten tower as an exportable module returning plain tensors.

    ``forward(pixel_values)`` runs ``adapter.prepare`` -> the rewritten block stack for the call's
    layout (on the tower's live weights) -> ``adapter.finish`` and returns ``(last_hidden_state,
    pooler_output, *deepstack_features)`` (the non-None ones, as a tuple; deepstack features: Qwen3-VL).  Every weight appears once, under the tower's
    own name.

    Args:
        tower: an :class:`IPCVTower`.
        example: positional example inputs (``(pixel_values,)``); required for packed towers and for
            grid-aware IPCV variants (the file is then for the example's layout / image size).
        fixed_kwargs: keyword inputs fixed for the file (``grid_thw`` of a packed layout,
            ``interpolate_pos_encoding=True`` for SigLIP / CLIP at other sizes); recorded in the
            file's metadata and checked by :func:`ipcv_compile.backends.artifacts.load_artifact`.
        embed: packed towers: the pixel-dependent part of ``prepare`` (default: the adapter's).
        vanilla: the same tower without pruning (the rewrite at retain 1.0 of the same capture) — the
            baseline for benchmarks of every backend.
    """

    def __init__(self, tower: nn.Module, example: Sequence[Any] = (), fixed_kwargs: Optional[Dict[str, Any]] = None,
                 embed: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None, vanilla: bool = False):
        super().__init__()
        if not isinstance(tower, IPCVTower):
            raise TypeError(f"TowerForExport expects an ipcv_adapters.IPCVTower, got {type(tower).__name__}")
        self.tower = tower.with_config(retain=1.0) if vanilla else tower
        self.fixed_kwargs = dict(fixed_kwargs or {})
        ad = self.tower.adapter
        self.packed = bool(ad.packed)
        self._embed = embed
        self._template = None
        self.grid_fixed = (not self.packed) and self.tower.ipcv_config.needs_grid
        example = tuple(example)
        if self.packed or self.grid_fixed:
            if not example:
                why = "a packed tower's file is for one layout" if self.packed else (
                    f"IPCV selection={self.tower.ipcv_config.selection!r} / reconstruction="
                    f"{self.tower.ipcv_config.reconstruction!r} needs the patch grid, so the file is for one image size")
                raise ValueError(f"TowerForExport: {why}: give example=(pixel_values,) (and fixed_kwargs)")
            with torch.no_grad():
                prep = ad.prepare(*example, **self.fixed_kwargs)
            if self.grid_fixed and prep.layout.grids is None:
                raise ValueError("TowerForExport: this input has no plain patch grid, which the IPCV config needs")
            self._template = prep
            for i, s in enumerate(prep.side):
                self.register_buffer(f"side_{i}", s, persistent=False)
            if self.packed:
                thw = self.fixed_kwargs.get("grid_thw")
                if not isinstance(thw, torch.Tensor):
                    raise ValueError("TowerForExport: a packed tower's file is for one layout: give "
                                     "fixed_kwargs={'grid_thw': the layout's grid_thw tensor}")
                setattr(self, LAYOUT_CHECK_SCOPE, LayoutCheck(thw))
            self.layout = prep.layout
            self.taps = ad.taps_for(prep)
            self.example_shape = tuple(example[0].shape)
        else:
            self.layout = SegmentLayout.batched(ad.protected)
            self.taps = tuple(ad.default_taps)
        self.sizes_dynamic = (not self.packed) and (not self.grid_fixed) and self._other_sizes_ok(example)
        if self.sizes_dynamic and example:
            self._check_example_prunes(example)
        # the rewritten graph this module runs (a compile-cache entry), built now (never under
        # export), held here so the compile cache cannot evict it
        self._entry = self.tower.graph_entry(self.layout, self.taps)

    # ------------------------------------------------------------------ what the file serves
    def _other_sizes_ok(self, example) -> bool:
        """Does the tower accept an image one patch larger than the example (position interpolation)?"""
        if not example or not isinstance(example[0], torch.Tensor) or example[0].dim() != 4:
            return True
        x = example[0]
        ps = getattr(self.tower.config, "patch_size", 14)
        ps = tuple(ps) if isinstance(ps, (list, tuple)) else (ps, ps)
        bigger = x.new_zeros(1, x.shape[1], x.shape[2] + int(ps[0]), x.shape[3] + int(ps[1]))
        try:
            with torch.no_grad():
                self.tower.adapter.prepare(bigger, **self.fixed_kwargs)
        except Exception:
            return False
        return True

    def _check_example_prunes(self, example) -> None:
        """A dynamic-size export specialises the file to the removed-row counts of its example where
        they are 0 or 1 (torch.export guards on an empty / one-row removed set: a view splits
        ``(B*R, D)`` into ``(B, R, D)`` differently when ``R == 1``), so the file would serve (almost)
        only the example's size.  Refuse such an example, naming the fix; the shape conditions the
        trace still records are written into ONNX files and checked by their loader."""
        from ipcv_core.prune import stage_plan

        cfg = self.tower.ipcv_config
        if cfg.retain >= 1.0:
            return  # nothing is removed at any size: no guard
        with torch.no_grad():
            prep = self.tower.adapter.prepare(*example, **self.fixed_kwargs)
        n = int(prep.hidden.shape[self.tower.adapter.spec.token_dim])
        for stage in range(len(cfg.schedule)):
            removed = min(int(s.remove) for s in stage_plan(prep.layout, cfg, stage, n).segments)
            if removed < 2:
                raise ValueError(
                    f"TowerForExport: the example ({list(example[0].shape)}) is so small that IPCV stage {stage} removes "
                    f"only {removed} token(s) from an image; an export traced on it would serve only sizes where that "
                    "holds. Export with a larger example image, from which every stage removes at least 2 tokens per "
                    "image (the file then serves the sizes where that holds too; the ONNX loader checks the shape "
                    "conditions the trace recorded and refuses other sizes, naming the condition)")

    def ipcv_dynamic_shapes(self, args: Sequence[Any]):
        """``dynamic_shapes`` for ``torch.export`` (read by :func:`ipcv_compile.lower`): the batch of
        batched towers, and the image size when :attr:`sizes_dynamic`; a packed file is static."""
        from torch.export import Dim

        if self.packed:
            return ({},)
        d = {0: Dim.AUTO}
        if self.sizes_dynamic:
            d.update({2: Dim.AUTO, 3: Dim.AUTO})
        return (d,)

    @property
    def ipcv_input_names(self) -> Tuple[str, ...]:
        """Names of the file's inputs (ONNX input names): a packed file takes its layout too."""
        return ("pixel_values", "grid_thw") if self.packed else ("pixel_values",)

    def ipcv_keyword_inputs(self) -> Dict[str, torch.Tensor]:
        """Keyword inputs an exported file takes besides ``pixel_values`` (read by the onnx / pt2
        backends): a packed file's ``grid_thw``, checked inside the graph (:class:`LayoutCheck`)."""
        return {"grid_thw": self.fixed_kwargs["grid_thw"]} if self.packed else {}

    @property
    def ipcv_check_messages(self) -> Dict[str, str]:
        """``{submodule name: message}`` of the in-graph checks, for the onnx backend to name the
        node that fails (onnxruntime's error then says why)."""
        return {LAYOUT_CHECK_SCOPE: getattr(self, LAYOUT_CHECK_SCOPE).message} if self.packed else {}

    @property
    def ipcv_dim_names(self) -> Dict[str, Dict[int, str]]:
        if self.packed:
            return {"pixel_values": {0: "patches"}}
        return {"pixel_values": {0: "batch", 2: "height", 3: "width"}}

    def ipcv_output_names(self, n: int) -> Tuple[str, ...]:
        return (OUTPUT_NAMES + tuple(f"deepstack_features_{i}" for i in range(max(n - len(OUTPUT_NAMES), 0))))[:n]

    def ipcv_metadata(self) -> Dict[str, Any]:
        """What the file is for, written into it (ONNX ``metadata_props["ipcv"]``, pt2 extra file
        ``ipcv.json``): ``fixed_inputs`` are checked by :func:`ipcv_compile.backends.artifacts.load_artifact` at every call."""
        t = self.tower
        # tensors among the fixed inputs describe the data (a packed layout's grid_thw): a call must
        # give them and they are checked; other fixed keywords are options baked into the graph
        fixed = {k: _to_json(v) for k, v in self.fixed_kwargs.items() if isinstance(v, torch.Tensor)}
        options = {k: _to_json(v) for k, v in self.fixed_kwargs.items() if not isinstance(v, torch.Tensor)}
        meta: Dict[str, Any] = {
            "producer": "ipcv", "format": 1, "adapter": t.adapter.name, "tower": type(t.tower).__name__,
            "ipcv_config": t.ipcv_config.to_dict(), "fixed_inputs": fixed, "options": options,
            "layout": None if not (self.packed or self.grid_fixed) else {
                "segment_lengths": None if self.layout.lengths is None else list(self.layout.lengths),
                "grids": None if self.layout.grids is None else [list(g) for g in self.layout.grids]},
            "image_size": "dynamic" if self.sizes_dynamic else (
                None if self.packed else "the example's (static)"),
        }
        if self.grid_fixed:
            meta["static_shapes"] = {"pixel_values": [None, *self.example_shape[1:]]}
        if self.packed:  # the file's grid_thw input, checked inside the graph
            meta["layout_input"] = "grid_thw"
        return meta

    # ------------------------------------------------------------------ forward
    def _embed_fn(self, pixel_values):
        if self._embed is not None:
            return self._embed(self.tower.tower, pixel_values)
        return self.tower.adapter.embed(pixel_values, self._template.context)

    def forward(self, pixel_values: torch.Tensor, grid_thw: Optional[torch.Tensor] = None):
        """``grid_thw`` (packed towers): the call's layout, checked against the file's
        (:class:`LayoutCheck`; exported files take it as an input); ``None``: not checked."""
        t = self.tower
        ad = t.adapter
        if grid_thw is not None:
            if not self.packed:
                raise TypeError("TowerForExport: grid_thw is an input of packed (Qwen-family) towers only")
            pixel_values = getattr(self, LAYOUT_CHECK_SCOPE)(pixel_values, grid_thw)
        if self.packed:
            side = tuple(getattr(self, f"side_{i}") for i in range(len(self._template.side)))
            prep = replace(self._template, hidden=self._embed_fn(pixel_values), side=side)
        else:
            # exporting: HF's "always interpolate when tracing" path (see _interpolating_adapter)
            embedder = _interpolating_adapter(ad) if torch.compiler.is_exporting() else ad
            prep = embedder.prepare(pixel_values, **self.fixed_kwargs)
            if self.grid_fixed:
                prep = replace(prep, layout=self.layout)
        taps = self.taps
        out = t.run_graph(self._entry, prep.stack_inputs)
        hidden, tapped = (out[0], dict(zip(taps, out[1:]))) if taps else (out, {})
        return _flat_outputs(ad.finish(hidden, prep, tapped))
