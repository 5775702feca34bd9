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
It is two small typed objects held by the tower: :class:`CaptureCache` (a :class:`CaptureEntry` —
captured GraphModule + :class:`~ipcv_adapters.binding.Binding` — per set of tapped blocks, shared
by ``with_config`` copies) and :class:`GraphCache` (the LRU of :class:`GraphEntry` — rewritten
graph, its capture, its functional form — the rows-checked flag, the counters).

``torch.compile``.  Batched towers are traced whole (the compiled code reads the cache without the
lock: no graph break beyond the vanilla tower's).  Packed towers (and grid-aware variants) have one
graph break: ``prepare`` and the layout dispatch — which may capture / rewrite, work that must never
run inside a compiled frame — run eagerly behind ``torch.compiler.disable``, then the layout's graph
module is called as a frame of its own, which the caller's ``torch.compile`` compiles once per
layout (see :meth:`IPCVTower._run_dispatched`).

The tower stays the tower.  ``IPCVTower`` is an ordinary ``nn.Module`` whose child ``tower`` is
the original module (shared, not copied); it reports the original's names (``named_modules`` walks
the original's tree under its own prefix; state-dict hooks drop the ``tower.`` level), so
``state_dict()`` keys, ``named_parameters()``, ``save_pretrained`` / ``from_pretrained`` of the VLM
around it are exactly the original tower's, and ``.to()``, ``.train()``, ``deepcopy``, pickling
reach the original through ``nn.Module``'s own recursion.  The graphs read the tower's **live**
tensors at every call (:mod:`ipcv_adapters.binding`): a parameter replaced or copied into after the
rewrite is used; a block submodule replaced (LoRA, a quantiser) or a dtype / device change
(``.to()`` after the rewrite) is detected at the next call, which captures again with a warning
naming what changed.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from ipcv_core.config import IPCVConfig
from ipcv_core.schedule import Schedule
from ipcv_core.segments import SegmentLayout

from .base import Prepared, TowerAdapter
from .binding import Binding, FunctionalGraph, capture_from_bytes, capture_to_bytes

__all__ = ["IPCVTower", "DEFAULT_CACHE_SIZE", "CaptureEntry", "CaptureCache", "GraphEntry", "GraphCache"]

DEFAULT_CACHE_SIZE = 32
_CHILD = "tower"  # the original tower's name as IPCVTower's child (hidden from every name it reports)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or \
        torch.fx._symbolic_trace.is_fx_symbolic_tracing()


@torch.compiler.disable
def _unflatten(fg: FunctionalGraph, out):
    return fg.unflatten(out)


def _dynamo_compiling() -> bool:
    """Inside ``torch.compile``'s trace (Dynamo), not ``torch.export``."""
    return torch.compiler.is_dynamo_compiling() and not torch.compiler.is_exporting()


# --------------------------------------------------------------------------------------------- the caches
class _Locked:
    """Copy / pickle support for a cache guarded by ``self.lock``: the lock is neither copied nor
    pickled (the copy gets a fresh one); everything else is deep-copied with the caller's memo, so
    tensors shared with the tower map to the copied tower's."""

    lock: threading.Lock

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in vars(self).items():
            setattr(new, k, threading.Lock() if k == "lock" else copy.deepcopy(v, memo))
        return new

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "lock"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        vars(self).update(state)
        self.lock = threading.Lock()


@dataclass(eq=False)
class CaptureEntry:
    """One captured block stack and what the capture assumed about the tower."""

    module: fx.GraphModule  # the captured block stack (its attributes: the tower's tensors at capture time)
    binding: Binding  # which tower tensor each of them is; what changed since (Binding.resolve)


class CaptureCache(_Locked):
    """The captured block stacks of one tower, one per set of tapped blocks (the adapter's
    ``default_taps``; another when a call asks for other hidden states); shared by the
    :meth:`IPCVTower.with_config` copies.  Pickled, each capture is a weightless ``torch.export``
    archive, bound again to the unpickled tower's tensors on first use (no capture on load)."""

    def __init__(self, adapter: TowerAdapter):
        self.adapter = adapter
        self.lock = threading.Lock()
        self.entries: Dict[Tuple[int, ...], CaptureEntry] = {}
        self.archives: Dict[Tuple[int, ...], Dict[str, Any]] = {}  # unpickled, not bound yet

    def peek(self, taps: Tuple[int, ...]) -> Optional[CaptureEntry]:
        """Without the lock (a dict read is atomic): for compiled code, which must not block."""
        return self.entries.get(taps)

    def get(self, taps: Tuple[int, ...], stats: Dict[str, Any]) -> CaptureEntry:
        """The capture for ``taps`` (bound from its archive, or captured now, counted in ``stats``)."""
        with self.lock:
            entry = self.entries.get(taps)
            if entry is None:
                if taps in self.archives:
                    entry = self._bind(capture_from_bytes(self.archives.pop(taps), self.adapter.blocks))
                else:
                    entry = self._capture(taps, stats)
                self.entries[taps] = entry
            return entry

    def _capture(self, taps: Tuple[int, ...], stats: Dict[str, Any]) -> CaptureEntry:
        from ipcv_compile import capture

        t0 = time.perf_counter()
        ad = self.adapter
        args, dyn = ad.example_inputs()
        with torch.inference_mode(False):
            gm = capture(ad.block_stack(taps), args, dynamic_shapes=dyn, hidden_index=0, token_dim=ad.spec.token_dim)
        stats["captures"] += 1
        stats["capture_s"] += time.perf_counter() - t0
        return self._bind(gm)

    def _bind(self, gm: fx.GraphModule) -> CaptureEntry:
        blocks = self.adapter.blocks
        prefix = next((p for p, m in self.adapter.tower.named_modules() if m is blocks), "blocks")
        return CaptureEntry(gm, Binding(blocks, gm, prefix))

    def drop(self, stale: CaptureEntry) -> bool:
        """Drop every capture when ``stale`` is one of them (True: this call dropped them)."""
        with self.lock:
            if not any(e is stale for e in self.entries.values()):
                return False
            self.entries.clear()
            self.archives.clear()
            return True

    def __getstate__(self) -> Dict[str, Any]:
        args, dyn = self.adapter.example_inputs()
        with self.lock:
            entries, archives = dict(self.entries), dict(self.archives)
        archives.update({taps: capture_to_bytes(e.module, e.binding, args, dyn) for taps, e in entries.items()})
        return {"adapter": self.adapter, "entries": {}, "archives": archives}


@dataclass(eq=False)
class GraphEntry:
    """One compile-cache entry: a rewritten block stack and how it runs on the tower's live tensors."""

    graph: Any  # the rewritten graph (ipcv_compile.IPCVModule: summary(), report, graph_module)
    capture: CaptureEntry  # the capture it was rewritten from (stale once that one is dropped)
    functional: FunctionalGraph  # the same graph with the bound tensors as inputs (fed the live ones)


class GraphCache(_Locked):
    """The compile cache of one :class:`IPCVTower`: rewritten graphs by ``(layout, taps)``, least
    recently used first, at most ``size``; whether the rewrite's rows check has run; the counters."""

    def __init__(self, size: int, rows_checked: bool):
        self.size = size
        self.lock = threading.Lock()
        self.entries: "OrderedDict[Tuple[SegmentLayout, Tuple[int, ...]], GraphEntry]" = OrderedDict()
        self.rows_checked = rows_checked
        self.stats: Dict[str, Any] = {"captures": 0, "rewrites": 0, "hits": 0, "capture_s": 0.0, "rewrite_s": 0.0,
                                      "recaptures": 0}

    def put(self, key, entry: GraphEntry) -> None:
        """Insert as the most recent entry, evicting beyond ``size`` (call with the lock held)."""
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def __getstate__(self) -> Dict[str, Any]:  # the compile cache is rebuilt on use after a load
        state = super().__getstate__()
        return {**state, "entries": OrderedDict(), "rows_checked": False}


# --------------------------------------------------------------------------------------------- state-dict names
def _rename(d, old: str, new: str) -> None:
    """Keys of ``d`` equal to ``old`` or starting with ``old + "."``: ``old`` -> ``new`` (order kept)."""
    for k in [k for k in d if k == old or k.startswith(old + ".")]:
        rest = k[len(old):]
        d[(new + rest) if new else rest.lstrip(".")] = d.pop(k)


def _original_keys(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """``state_dict`` post-hook: ``<prefix>tower.<key>`` -> ``<prefix><key>``, the original tower's keys."""
    _rename(state_dict, prefix + _CHILD, prefix[:-1])
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        meta.pop(prefix[:-1], None)
        _rename(meta, prefix + _CHILD, prefix[:-1])


def _child_keys(module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs) -> None:
    """``load_state_dict`` pre-hook: the original tower's keys ``<prefix><key>`` -> ``<prefix>tower.<key>``
    (in ``load_state_dict``'s own copy of the dict; the caller's ``_metadata`` is left alone)."""
    for k in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[f"{prefix}{_CHILD}.{k[len(prefix):]}"] = state_dict.pop(k)


# --------------------------------------------------------------------------------------------- the module
class IPCVTower(nn.Module):
    """A vision tower with IPCV inside its block stack; same call signature and output type as the
    original tower (attributes it does not define, such as ``config``, ``dtype`` or
    ``spatial_merge_size``, are read from the original).

    The original tower is its child ``tower`` (shared, not copied), but every name it reports is the
    original's: ``named_parameters()``, ``named_buffers()``, ``named_modules()`` and ``state_dict()``
    keys carry no ``tower.`` level, so a VLM holding it saves and loads as if it held the original;
    ``.to()``, ``.train()``, ``deepcopy`` and pickling are ``nn.Module``'s own.  The rewritten graphs
    are specialised to the dtype and device the tower had when it was captured: move / cast the
    model first, then rewrite (a later ``.to()`` is noticed and costs one more capture).
    """

    def __init__(self, tower: nn.Module, adapter: TowerAdapter, config: IPCVConfig,
                 cache_size: int = DEFAULT_CACHE_SIZE, captured: Optional[CaptureCache] = None,
                 verify_rows: bool = True):
        super().__init__()
        schedule = adapter.schedule(config)  # the one resolution of this tower's config
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be an int >= 1, got {cache_size!r}")
        if captured is not None and not isinstance(captured, CaptureCache):
            raise TypeError(f"captured must be another IPCVTower's capture cache (its _captured), got "
                            f"{type(captured).__name__}")
        setattr(self, _CHILD, tower)  # a registered child: .to() / .train() / deepcopy / pickle reach it
        self.register_state_dict_post_hook(_original_keys)
        self.register_load_state_dict_pre_hook(_child_keys)
        self.adapter = adapter
        self.ipcv_schedule: Schedule = schedule
        # one capture per set of tapped blocks, shared by with_config() copies; the pass's
        # postcondition on the rows every block sees (a fake-tensor run of the graph) is verified on
        # this tower's first rewrite (later layouts go through the same steps)
        self._captured = captured if captured is not None else CaptureCache(adapter)
        self._cache = GraphCache(cache_size, rows_checked=not verify_rows)
        self._batched_layout = SegmentLayout.batched(adapter.protected)
        self.capture_for(adapter.default_taps)
        if not adapter.packed and not self.ipcv_config.needs_grid:  # one graph for every batch and image size
            self.graph_for(self._batched_layout)

    @property
    def ipcv_config(self) -> IPCVConfig:
        """The resolved config (``ipcv_schedule.config``); another config is another tower
        (:meth:`with_config`)."""
        return self.ipcv_schedule.config

    @property
    def cache_size(self) -> int:
        return self._cache.size

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters of this tower's compile cache: captures, rewrites, hits, their seconds, recaptures."""
        return self._cache.stats

    # ------------------------------------------------------------------ graphs
    def capture_for(self, taps: Tuple[int, ...]) -> fx.GraphModule:
        """The captured block stack returning the outputs of ``taps`` besides the last (captured on
        first use)."""
        return self._capture(tuple(taps)).module

    def _capture(self, taps: Tuple[int, ...]) -> CaptureEntry:
        if _dynamo_compiling():  # compiled code reads without the lock; a miss captures eagerly
            entry = self._captured.peek(taps)
            return entry if entry is not None else self._capture_eager(taps)
        return self._captured.get(taps, self._cache.stats)

    @torch.compiler.disable
    def _capture_eager(self, taps: Tuple[int, ...]) -> CaptureEntry:
        return self._captured.get(taps, self._cache.stats)

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
        return self.graph_entry(layout, taps).graph

    def graph_entry(self, layout: SegmentLayout, taps: Optional[Tuple[int, ...]] = None) -> GraphEntry:
        """:meth:`graph_for`'s cache entry: the graph, its capture and its functional form (what
        :meth:`run_graph` runs)."""
        taps = tuple(self.adapter.default_taps if taps is None else taps)
        if _dynamo_compiling():
            # compiled code (batched towers, whose one graph is built at rewrite): a lock-free read (a
            # dict read is atomic); anything else — a miss, the LRU order, the stats — runs eagerly
            if layout.lengths is None and not self.ipcv_config.needs_grid:
                entry = self._cache.entries.get((self._batched_layout, taps))
                if entry is not None and entry.capture is self._captured.peek(taps):
                    return entry
            return self._graph_eager(layout, taps)
        return self._graph_locked(layout, taps)

    @torch.compiler.disable
    def _graph_eager(self, layout: SegmentLayout, taps: Tuple[int, ...]) -> GraphEntry:
        return self._graph_locked(layout, taps)

    def _graph_locked(self, layout: SegmentLayout, taps: Tuple[int, ...]) -> GraphEntry:
        from ipcv_compile import rewrite_graph

        if not self.ipcv_config.needs_grid:  # the grid matters only to grid-aware variants
            layout = layout.without_grid()
        key = (layout, taps)
        captured = self._capture(taps)
        cache = self._cache
        with cache.lock:
            entry = cache.entries.get(key)
            if entry is not None and entry.capture is captured:
                cache.entries.move_to_end(key)
                cache.stats["hits"] += 1
                return entry
            t0 = time.perf_counter()
            g = rewrite_graph(captured.module, self.ipcv_schedule, self.adapter.spec, layout,
                              check_rows=not cache.rows_checked)
            entry = GraphEntry(g, captured, FunctionalGraph(g.graph_module, captured.binding))
            cache.rows_checked = True
            cache.stats["rewrites"] += 1
            cache.stats["rewrite_s"] += time.perf_counter() - t0
            cache.put(key, entry)
            return entry

    def run_stack(self, layout: SegmentLayout, taps: Sequence[int], inputs: Sequence[torch.Tensor]):
        """The rewritten block stack for ``layout`` on ``inputs``, reading the tower's tensors as they
        are now.  A change the graph cannot follow (a block submodule replaced / added / removed, a
        tensor of another dtype, device or shape) captures the block stack again, with a warning."""
        entry, tensors = self._entry_and_tensors(layout, tuple(taps))
        return entry.functional(tensors, *inputs)

    def _entry_and_tensors(self, layout: SegmentLayout, taps: Tuple[int, ...]):
        """The compile-cache entry for ``layout`` and the tower's tensors it runs on (resolved once per
        call: the same tensors run the graph); captures again when the tower changed."""
        for attempt in range(2):
            entry = self.graph_entry(layout, taps)
            tensors, why = entry.capture.binding.resolve(self.adapter.blocks)
            if why is None:
                return entry, tensors
            if attempt or (_tracing() and not _dynamo_compiling()):
                raise RuntimeError(f"ipcv: the rewritten block stack cannot run this tower: {why}")
            if _dynamo_compiling():
                self._recapture_eager(why, entry.capture)
            else:
                self._recapture(why, entry.capture)

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
        entry, tensors = self._entry_and_tensors(prep.layout, taps)
        fg = entry.functional
        return prep, taps, fg, [tensors[t] for t in fg.targets]

    @torch.compiler.disable(recursive=False)
    def _run_dispatched(self, args, kwargs):
        prep, taps, fg, weights = self._dispatch(args, kwargs)
        out = fg.gm(*weights, *prep.stack_inputs)  # a frame of its own, compiled by the caller's torch.compile
        return prep, taps, _unflatten(fg, out)

    @torch.compiler.disable
    def _recapture_eager(self, why: str, stale: CaptureEntry) -> None:
        self._recapture(why, stale)

    def run_graph(self, entry: GraphEntry, inputs: Sequence[torch.Tensor]):
        """Run a compile-cache entry (from :meth:`graph_entry`) on ``inputs`` with the tower's live
        tensors; raises when the tower changed in a way it cannot follow (see :meth:`run_stack`)."""
        if not isinstance(entry, GraphEntry):
            raise TypeError(f"run_graph expects an IPCVTower.graph_entry(...), got {type(entry).__name__}")
        tensors, why = entry.capture.binding.resolve(self.adapter.blocks)
        if why is not None:
            raise RuntimeError(f"ipcv: this rewritten graph no longer matches the tower: {why}; get a new one "
                               "(tower.graph_entry / TowerForExport) after the change")
        return entry.functional(tensors, *inputs)

    def _recapture(self, why: str, stale: CaptureEntry) -> None:
        """Drop captures and graphs made before the tower changed (next use captures again)."""
        if self._captured.drop(stale):
            warnings.warn(
                f"ipcv: {why} since the block stack was captured; capturing it again (rewrite after "
                "changing the tower — e.g. after .to(dtype / device), LoRA wrapping or quantisation — "
                "to avoid this)", stacklevel=4)
        with self._cache.lock:
            self._cache.entries.clear()
            self._cache.stats["recaptures"] += 1
            self._cache.rows_checked = False

    @property
    def cached_layouts(self) -> List[SegmentLayout]:
        with self._cache.lock:
            return [layout for layout, _ in self._cache.entries]

    def clear_cache(self) -> None:
        with self._cache.lock:
            self._cache.entries.clear()

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

    # ------------------------------------------------------------------ the original's names
    # The two overrides left, both so that the module reads as the original tower:
    def __getattr__(self, name: str) -> Any:
        """A drop-in: what IPCVTower does not define (``config``, ``dtype``, ``spatial_merge_size``,
        the original's submodules by their names: ``get_submodule("encoder.layer.0")``) is the
        original tower's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            tower = self.__dict__.get("_modules", {}).get(_CHILD)
            if tower is None or name.startswith("__"):
                raise
            return getattr(tower, name)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """This module, then the original tower's modules under this module's own prefix (no
        ``tower.`` level): ``named_parameters()`` / ``named_buffers()`` / ``parameters()`` (which walk
        this) give the original's names, also inside a VLM holding this module."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        yield from getattr(self, _CHILD).named_modules(memo, prefix, remove_duplicate)

    # ------------------------------------------------------------------ introspection
    def rows(self, *args, **kwargs) -> List[Dict[str, int]]:
        """Per block, the rows its attention queries / keys and its FFN see for this input (the
        tower's call signature; per batch row for batched towers)."""
        return self._rows_for(self.adapter.prepare(*args, **kwargs))

    def _rows_for(self, prep: Prepared) -> List[Dict[str, int]]:
        n = int(prep.hidden.shape[self.adapter.spec.token_dim])
        return self.ipcv_schedule.rows(prep.layout, n)

    def summary(self, layout: Optional[SegmentLayout] = None, example: Optional[Tuple[tuple, dict]] = None) -> str:
        """The adapter, the IPCV config and the rewritten graph's per-block rows (for ``layout``,
        default: the batched layout, or the most recently used packed one).  ``example``:
        ``(args, kwargs)`` of a call — the rows are then given as numbers for that input."""
        lines = [f"IPCVTower[{self.adapter.describe()}]",
                 f"compile cache: {len(self.cached_layouts)}/{self.cache_size} layouts; stats {self.stats}"]
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
            cfg = self.ipcv_config
            lines += self.ipcv_schedule.table(self._rows_for(prep))
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
                f"as_depth={c.as_depth}, k={c.k}, cached_layouts={len(self.cached_layouts)}")

