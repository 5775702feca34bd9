"""``IPCVTower``: the drop-in module returned by ``ipcv_compile.rewrite(tower, retain=...)``.

Per call: ``adapter.prepare`` (eager, data-dependent: patch embedding, rotary tables, segment
layout, mask) -> the rewritten block-stack graph for that layout -> ``adapter.finish`` (final norm,
merger, pooler) -> the tower's own output type.

Graphs.  The block stack is captured **once** (``ipcv_compile.capture``, dynamic token dimension —
and batch dimension for batched towers).  The rewrite bakes static per-segment keep counts ``K``:

* batched layouts (DINOv2 / SigLIP / CLIP images, InternVL tiles): one segment per batch row, ``K``
  follows the symbolic token count, so **one** rewritten graph serves every batch size and
  resolution; it is built when the tower is rewritten.
* packed layouts (Qwen2-VL: one segment per image / video frame): the rewritten graph is specific to
  the segment lengths, so ``ipcv_compile.rewrite_graph`` runs per new layout (a fraction of a second)
  and the result is kept in a small LRU cache keyed by the :class:`SegmentLayout`.

The cache is a **compile cache**, not per-call state: an entry is a pure function of the layout,
guarded by a lock; calls keep everything else in locals, so one module may serve several threads.

``torch.compile``.  Batched towers are traced whole (the compiled code reads the cache without the
lock: no graph break beyond the vanilla tower's).  Packed towers (and grid-aware variants) have one
graph break: ``prepare`` and the layout dispatch — which may capture / rewrite, work that must never
run inside a compiled frame — run eagerly behind ``torch.compiler.disable``, then the layout's graph
module is called as a frame of its own, which the caller's ``torch.compile`` compiles once per
layout (see :meth:`IPCVTower._run_dispatched`).

The tower stays the tower.  ``IPCVTower`` *is* the original module's parameter tree (it shares the
original's ``_parameters`` / ``_buffers`` / ``_modules``), so ``state_dict()`` keys,
``named_parameters()``, ``save_pretrained`` / ``from_pretrained`` of the VLM around it and ``.to()``
are exactly the original tower's.  The graphs read the tower's **live** tensors at every call
(:mod:`ipcv_adapters.binding`): a parameter replaced or copied into after the rewrite is used; a
block submodule replaced (LoRA, a quantiser) or a dtype / device change (``.to()`` after the
rewrite) is detected at the next call, which captures again with a warning naming what changed.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ipcv_core.config import IPCVConfig
from ipcv_core.segments import SegmentLayout

from .base import Prepared, TowerAdapter
from .binding import Binding, FunctionalGraph, capture_from_bytes, capture_to_bytes

__all__ = ["IPCVTower", "DEFAULT_CACHE_SIZE"]

DEFAULT_CACHE_SIZE = 32
_REGISTRIES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or \
        torch.fx._symbolic_trace.is_fx_symbolic_tracing()


@torch.compiler.disable
def _unflatten(fg: FunctionalGraph, out):
    return fg.unflatten(out)


def _dynamo_compiling() -> bool:
    """Inside ``torch.compile``'s trace (Dynamo), not ``torch.export``."""
    return torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting()


class IPCVTower(nn.Module):
    """A vision tower with IPCV inside its block stack; same call signature and output type as the
    original tower (attributes it does not define, such as ``config``, ``dtype`` or
    ``spatial_merge_size``, are read from the original).

    Its parameters, buffers, submodules and ``state_dict`` keys are the original tower's own (shared,
    not copied): a VLM holding it saves and loads as if it held the original.  The rewritten graphs
    are specialised to the dtype and device the tower had when it was captured: move / cast the
    model first, then rewrite (a later ``.to()`` is noticed and costs one more capture).
    """

    def __init__(self, tower: nn.Module, adapter: TowerAdapter, config: IPCVConfig,
                 cache_size: int = DEFAULT_CACHE_SIZE, captured: Optional[Dict[Tuple[int, ...], Any]] = None,
                 verify_rows: bool = True):
        super().__init__()
        config = adapter.resolve_config(config)
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be an int >= 1, got {cache_size!r}")
        d = self.__dict__  # the rest stays out of nn.Module's registries (no duplicate state_dict keys)
        d["tower"] = tower
        for reg in _REGISTRIES:  # the original's own parameter tree: same keys, same tensors
            d[reg] = tower.__dict__[reg]
        d["adapter"] = adapter
        d["ipcv_config"] = config
        d["cache_size"] = cache_size
        d["_lock"] = threading.Lock()
        d["_graphs"] = OrderedDict()
        d["stats"] = {"captures": 0, "rewrites": 0, "hits": 0, "capture_s": 0.0, "rewrite_s": 0.0, "recaptures": 0}
        # one capture per set of tapped blocks (the default: the adapter's, e.g. deepstack blocks;
        # another when a call asks for other hidden states), shared by with_config() copies
        d["_captured"] = captured if captured is not None else {}
        self.capture_for(adapter.default_taps)
        # the pass's postcondition on the rows every block sees (a fake-tensor run of the graph) is
        # verified on this tower's first rewrite; later layouts go through the same steps
        d["_rows_checked"] = not verify_rows
        d["_batched_layout"] = SegmentLayout.batched(adapter.protected)
        if not adapter.packed and not config.needs_grid:  # one graph for every batch and image size
            self.graph_for(self._batched_layout)

    # ------------------------------------------------------------------ graphs
    def _blocks_prefix(self) -> str:
        blocks = self.adapter.blocks
        for path, m in self.tower.named_modules():
            if m is blocks:
                return path
        return "blocks"

    def capture_for(self, taps: Tuple[int, ...]):
        """The captured block stack returning the outputs of ``taps`` besides the last (captured on
        first use)."""
        taps = tuple(taps)
        if _dynamo_compiling():  # compiled code reads without the lock (a dict read is atomic); a miss captures eagerly
            gm = self._captured.get(taps)
            return gm if gm is not None else self._capture_eager(taps)
        return self._capture_locked(taps)

    @torch.compiler.disable
    def _capture_eager(self, taps: Tuple[int, ...]):
        return self._capture_locked(taps)

    def _capture_locked(self, taps: Tuple[int, ...]):
        from ipcv_compile import capture

        with self._lock:
            gm = self._captured.get(taps)
            if gm is None:
                t0 = time.perf_counter()
                stack = self.adapter.block_stack(taps)
                args, dyn = self.adapter.example_inputs()
                with torch.inference_mode(False):
                    gm = capture(stack, args, dynamic_shapes=dyn, hidden_index=0, token_dim=self.adapter.spec.token_dim)
                # what the capture assumed about the tower (kept with it; never deep-copied)
                gm.__dict__["_ipcv_binding"] = Binding(self.adapter.blocks, gm, self._blocks_prefix())
                self._captured[taps] = gm
                self.stats["captures"] += 1
                self.stats["capture_s"] += time.perf_counter() - t0
            return gm

    def with_config(self, config: Optional[IPCVConfig] = None, *, verify_rows: bool = True, **changes) -> "IPCVTower":
        """Another IPCVTower on the same tower with another IPCV config (``retain=0.2``, ...), sharing
        this one's capture (only the rewrite runs again).  ``verify_rows=False`` skips the fake-tensor
        check of the rows every block sees on its first rewrite (the rewrite pass's postcondition)."""
        config = (config or self.ipcv_config).replace(**changes)
        return IPCVTower(self.tower, self.adapter, config, self.cache_size, captured=self._captured,
                         verify_rows=verify_rows)

    def graph_for(self, layout: SegmentLayout, taps: Optional[Tuple[int, ...]] = None) -> nn.Module:
        """The rewritten block stack for ``layout`` (from the compile cache, or rewritten now),
        returning the outputs of ``taps`` too (default: the adapter's ``default_taps``).  Its
        attributes are the tensors of the tower at capture time; :meth:`run_stack` runs it on the
        tower's live tensors."""
        taps = tuple(self.adapter.default_taps if taps is None else taps)
        if _dynamo_compiling():
            # compiled code (batched towers, whose one graph is built at rewrite): a lock-free read (a
            # dict read is atomic); anything else — a miss, the LRU order, the stats — runs eagerly
            if layout.lengths is None and not self.ipcv_config.needs_grid:
                g = self._graphs.get((self._batched_layout, taps))
                if g is not None and g.__dict__.get("_ipcv_capture") is self._captured.get(taps):
                    return g
            return self._graph_eager(layout, taps)
        return self._graph_locked(layout, taps)

    @torch.compiler.disable
    def _graph_eager(self, layout: SegmentLayout, taps: Tuple[int, ...]):
        return self._graph_locked(layout, taps)

    def _graph_locked(self, layout: SegmentLayout, taps: Tuple[int, ...]):
        from ipcv_compile import rewrite_graph

        if not self.ipcv_config.needs_grid:  # the grid matters only to grid-aware variants
            layout = layout.without_grid()
        key = (layout, taps)
        captured = self.capture_for(taps)
        with self._lock:
            g = self._graphs.get(key)
            if g is not None and g.__dict__.get("_ipcv_capture") is captured:
                self._graphs.move_to_end(key)
                self.stats["hits"] += 1
                return g
            t0 = time.perf_counter()
            g = rewrite_graph(captured, self.ipcv_config, self.adapter.spec, layout,
                              check_rows=not self._rows_checked)
            # the same graph with the bound tensors as inputs (fed the live ones by run_stack)
            g.__dict__["_ipcv_capture"] = captured
            g.__dict__["_ipcv_functional"] = FunctionalGraph(g.graph_module, captured.__dict__["_ipcv_binding"])
            self.__dict__["_rows_checked"] = True
            self.stats["rewrites"] += 1
            self.stats["rewrite_s"] += time.perf_counter() - t0
            self._graphs[key] = g
            self._graphs.move_to_end(key)
            while len(self._graphs) > self.cache_size:
                self._graphs.popitem(last=False)
            return g

    def run_stack(self, layout: SegmentLayout, taps: Sequence[int], inputs: Sequence[torch.Tensor]):
        """The rewritten block stack for ``layout`` on ``inputs``, reading the tower's tensors as they
        are now.  A change the graph cannot follow (a block submodule replaced / added / removed, a
        tensor of another dtype, device or shape) captures the block stack again, with a warning."""
        g, tensors = self._graph_and_tensors(layout, tuple(taps))
        return g.__dict__["_ipcv_functional"](tensors, *inputs)

    def _graph_and_tensors(self, layout: SegmentLayout, taps: Tuple[int, ...]):
        """The rewritten graph for ``layout`` and the tower's tensors it runs on (resolved once per
        call: the same tensors run the graph); captures again when the tower changed."""
        for attempt in range(2):
            g = self.graph_for(layout, taps)
            tensors, why = self._resolve(g)
            if why is None:
                return g, tensors
            if attempt or (_tracing() and not _dynamo_compiling()):
                raise RuntimeError(f"ipcv: the rewritten block stack cannot run this tower: {why}")
            if _dynamo_compiling():
                self._recapture_eager(why, g.__dict__["_ipcv_capture"])
            else:
                self._recapture(why, g.__dict__["_ipcv_capture"])

    # ------------------------------------------------------------------ torch.compile
    # Batched towers (one graph for every batch and size) are traced whole by torch.compile: the graph
    # is read without the lock.  Packed towers (and grid-aware variants) need data-dependent work
    # (prepare: ``grid_thw.tolist()`` ...) and a graph per layout, which may have to be captured /
    # rewritten (a fake-tensor run of the graph: never inside a compiled frame, where torch would call
    # compiled kernels on fake tensors).  So that part is one graph break: ``_run_dispatched`` runs
    # ``_dispatch`` eagerly, then calls the layout's graph module, whose frame the surrounding
    # torch.compile compiles on its own (with the caller's backend, once per layout: its own code
    # object, so new layouts do not count against the recompile limit of the tower's frames).
    @torch.compiler.disable
    def _dispatch(self, args, kwargs):
        prep: Prepared = self.adapter.prepare(*args, **kwargs)
        taps = self.adapter.taps_for(prep)
        g, tensors = self._graph_and_tensors(prep.layout, taps)
        fg: FunctionalGraph = g.__dict__["_ipcv_functional"]
        return prep, taps, fg, [tensors[t] for t in fg.targets]

    @torch.compiler.disable(recursive=False)
    def _run_dispatched(self, args, kwargs):
        prep, taps, fg, weights = self._dispatch(args, kwargs)
        out = fg.gm(*weights, *prep.stack_inputs)  # a frame of its own, compiled by the caller's torch.compile
        return prep, taps, _unflatten(fg, out)

    @torch.compiler.disable
    def _recapture_eager(self, why: str, stale) -> None:
        self._recapture(why, stale)

    def _resolve(self, g) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
        binding: Binding = g.__dict__["_ipcv_capture"].__dict__["_ipcv_binding"]
        return binding.resolve(self.adapter.blocks)

    def run_graph(self, g, inputs: Sequence[torch.Tensor]):
        """Run the rewritten graph ``g`` (from :meth:`graph_for`) on ``inputs`` with the tower's live
        tensors; raises when the tower changed in a way ``g`` cannot follow (see :meth:`run_stack`)."""
        tensors, why = self._resolve(g)
        if why is not None:
            raise RuntimeError(f"ipcv: this rewritten graph no longer matches the tower: {why}; get a new one "
                               "(tower.graph_for / TowerForExport) after the change")
        return g.__dict__["_ipcv_functional"](tensors, *inputs)

    def _recapture(self, why: str, stale) -> None:
        """Drop captures and graphs made before the tower changed (next use captures again)."""
        with self._lock:
            if any(gm is stale for gm in self._captured.values()):
                warnings.warn(
                    f"ipcv: {why} since the block stack was captured; capturing it again (rewrite after "
                    "changing the tower — e.g. after .to(dtype / device), LoRA wrapping or quantisation — "
                    "to avoid this)", stacklevel=4)
                self._captured.clear()
            self._graphs.clear()
            self.stats["recaptures"] += 1
            self.__dict__["_rows_checked"] = False

    @property
    def cached_layouts(self) -> List[SegmentLayout]:
        with self._lock:
            return [layout for layout, _ in self._graphs]

    def clear_cache(self) -> None:
        with self._lock:
            self._graphs.clear()

    # ------------------------------------------------------------------ call
    def forward(self, *args, **kwargs):
        if _dynamo_compiling() and (self.adapter.packed or self.ipcv_config.needs_grid):
            prep, taps, out = self._run_dispatched(args, kwargs)  # one graph break (see _run_dispatched)
        else:
            prep: Prepared = self.adapter.prepare(*args, **kwargs)
            taps = self.adapter.taps_for(prep)
            out = self.run_stack(prep.layout, taps, prep.stack_inputs)
        hidden, tapped = (out[0], dict(zip(taps, out[1:]))) if taps else (out, {})
        if not _tracing():
            self._warn_nonfinite(hidden, prep.layout)
        return self.adapter.finish(hidden, prep, tapped)

    def _warn_nonfinite(self, hidden: torch.Tensor, layout: SegmentLayout) -> None:
        """The NaN rule (README): an image whose values are not finite gets NaN outputs and every
        other image is unaffected; this says which ones."""
        h = hidden.unsqueeze(0) if self.adapter.spec.token_dim == 0 else hidden
        finite = torch.isfinite(h).all(-1)  # (B, N)
        if bool(finite.all()):
            return
        if layout.lengths is None:
            bad = (~finite.all(-1)).nonzero().flatten().tolist()
            what = "image(s) / tile(s) (batch rows)"
        else:
            ok = [bool(s.all()) for s in torch.split(finite[0], list(layout.lengths))]
            bad = [i for i, v in enumerate(ok) if not v]
            what = "segment(s) (images / video frames, in input order)"
        warnings.warn(f"ipcv: {what} {bad} hold non-finite values (NaN / inf) after the block stack — a non-finite "
                      "input? Their outputs are NaN; every other image's output is unaffected.", stacklevel=3)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            tower = self.__dict__.get("tower")
            if tower is None or name.startswith("__"):
                raise
            return getattr(tower, name)

    # ------------------------------------------------------------------ the original's module tree
    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() / .half(): the original's own _apply
        self.tower._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        self.tower.train(mode)
        self.training = mode
        return self

    # ------------------------------------------------------------------ copy / pickle
    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "_lock":
                new.__dict__[k] = copy.deepcopy(v, memo)
        new.__dict__["_lock"] = threading.Lock()
        prefix = new._blocks_prefix()
        for gm in new._captured.values():  # the copy's capture is bound to the copy's tensors
            gm.__dict__["_ipcv_binding"] = Binding(new.adapter.blocks, gm, prefix)
        return new

    def __getstate__(self):
        """Pickle (``torch.save(tower)``): the original tower, the adapter, the config and each
        capture as a weightless ``torch.export`` archive bound again to the tower's tensors on load,
        so loading needs no capture; the compile cache is rebuilt on use."""
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_graphs"] = OrderedDict()
        args, dyn = self.adapter.example_inputs()
        state["_captured"] = {}
        state["_captured_archives"] = {
            taps: capture_to_bytes(gm, gm.__dict__["_ipcv_binding"], args, dyn) for taps, gm in self._captured.items()}
        state["_rows_checked"] = False
        return state

    def __setstate__(self, state):
        archives = state.pop("_captured_archives", {})
        super().__setstate__(state)
        self.__dict__["_lock"] = threading.Lock()
        self.__dict__.setdefault("_batched_layout", SegmentLayout.batched(self.adapter.protected))
        prefix = self._blocks_prefix()
        for taps, st in archives.items():
            gm = capture_from_bytes(st, self.adapter.blocks)
            gm.__dict__["_ipcv_binding"] = Binding(self.adapter.blocks, gm, prefix)
            self._captured[taps] = gm

    # ------------------------------------------------------------------ introspection
    def rows(self, *args, **kwargs) -> List[Dict[str, int]]:
        """Per block, the rows its attention queries / keys and its FFN see for this input (the
        tower's call signature; per batch row for batched towers)."""
        return self._rows_for(self.adapter.prepare(*args, **kwargs))

    def _rows_for(self, prep: Prepared) -> List[Dict[str, int]]:
        from ipcv_compile.passes.ipcv_rewrite import expected_rows

        n = int(prep.hidden.shape[self.adapter.spec.token_dim])
        return expected_rows(self.ipcv_config, prep.layout, self.adapter.depth, n)

    def summary(self, layout: Optional[SegmentLayout] = None, example: Optional[Tuple[tuple, dict]] = None) -> str:
        """The adapter, the IPCV config and the rewritten graph's per-block rows (for ``layout``,
        default: the batched layout, or the most recently used packed one).  ``example``:
        ``(args, kwargs)`` of a call — the rows are then given as numbers for that input."""
        lines = [f"IPCVTower[{self.adapter.describe()}]",
                 f"compile cache: {len(self._graphs)}/{self.cache_size} layouts; stats {self.stats}"]
        if example is not None:
            args, kwargs = example
            prep = self.adapter.prepare(*args, **kwargs)
            layout = prep.layout
            text = self.graph_for(layout).summary()
            head = text.split("\nblock |")[0]
            lines.append(head)
            n = int(prep.hidden.shape[self.adapter.spec.token_dim])
            seg = "per batch row" if layout.lengths is None else f"segments {list(layout.lengths)}"
            lines.append(f"rows for this input ({n} tokens {seg}):")
            lines.append("block | mode              | queries | keys/values | FFN rows")
            from ipcv_compile.api import block_mode

            cfg = self.ipcv_config
            for b, r in enumerate(self._rows_for(prep)):
                lines.append(f"{b:>5} | {block_mode(cfg, b):<17} | {r['queries']:>7} | {r['keys']:>11} | {r['ffn']}")
            if cfg.reintegrate:
                lines.append(f"after last block: reintegration (NGR + restore to {n} rows, original order)")
            return "\n".join(lines)
        if layout is None:
            layouts = self.cached_layouts
            layout = layouts[-1] if layouts else None
        if layout is not None:
            lines.append(self.graph_for(layout).summary())
        return "\n".join(lines)

    def extra_repr(self) -> str:
        c = self.ipcv_config
        return (f"adapter={self.adapter.name}, retain={c.retain}, prune_layer={c.prune_layer}, "
                f"as_depth={c.as_depth}, k={c.k}, cached_layouts={len(self._graphs)}")

