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
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, List, Optional

import torch
from torch import nn

from ipcv_core.config import IPCVConfig
from ipcv_core.segments import SegmentLayout

from .base import Prepared, TowerAdapter

__all__ = ["IPCVTower", "DEFAULT_CACHE_SIZE"]

DEFAULT_CACHE_SIZE = 32


class IPCVTower(nn.Module):
    """A vision tower with IPCV inside its block stack; same call signature and output type as the
    original tower (attributes it does not define, such as ``config``, ``dtype`` or
    ``spatial_merge_size``, are read from the original).

    The rewritten graphs are specialised to the dtype and device the tower had when it was
    rewritten: move / cast the model first, then rewrite.
    """

    def __init__(self, tower: nn.Module, adapter: TowerAdapter, config: IPCVConfig,
                 cache_size: int = DEFAULT_CACHE_SIZE, captured: Optional[torch.fx.GraphModule] = None):
        super().__init__()
        config.validate_depth(adapter.depth)
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.tower = tower  # registered: parameters / .to() / state_dict of the original weights
        d = self.__dict__  # the rest stays out of nn.Module's registries (no duplicate state_dict keys)
        d["adapter"] = adapter
        d["ipcv_config"] = config
        d["cache_size"] = cache_size
        d["_lock"] = threading.Lock()
        d["_graphs"] = OrderedDict()
        d["stats"] = {"captures": 0, "rewrites": 0, "hits": 0, "capture_s": 0.0, "rewrite_s": 0.0}
        if captured is None:
            t0 = time.perf_counter()
            captured = self._capture()
            self.stats["captures"] += 1
            self.stats["capture_s"] += time.perf_counter() - t0
        d["_captured"] = captured
        # the pass's postcondition on the rows every block sees (a fake-tensor run of the graph) is
        # verified on this tower's first rewrite; later layouts go through the same steps
        d["_rows_checked"] = False
        if not adapter.packed and not config.needs_grid:  # one graph for every batch and image size
            self.graph_for(SegmentLayout.batched(adapter.protected))

    # ------------------------------------------------------------------ graphs
    def _capture(self):
        from ipcv_compile import capture

        stack = self.adapter.block_stack()
        args, dyn = self.adapter.example_inputs()
        gm = capture(stack, args, dynamic_shapes=dyn, hidden_index=0, token_dim=self.adapter.spec.token_dim)
        return gm

    def with_config(self, config: Optional[IPCVConfig] = None, **changes) -> "IPCVTower":
        """Another IPCVTower on the same tower with another IPCV config (``retain=0.2``, ...), sharing
        this one's capture (only the rewrite runs again)."""
        config = (config or self.ipcv_config).replace(**changes)
        return IPCVTower(self.tower, self.adapter, config, self.cache_size, captured=self._captured)

    def graph_for(self, layout: SegmentLayout) -> nn.Module:
        """The rewritten block stack for ``layout`` (from the compile cache, or rewritten now)."""
        from ipcv_compile import rewrite_graph

        if not self.ipcv_config.needs_grid:  # the grid matters only to grid-aware variants
            layout = layout.without_grid()
        with self._lock:
            g = self._graphs.get(layout)
            if g is not None:
                self._graphs.move_to_end(layout)
                self.stats["hits"] += 1
                return g
            t0 = time.perf_counter()
            g = rewrite_graph(self._captured, self.ipcv_config, self.adapter.spec, layout,
                              check_rows=not self._rows_checked)
            self.__dict__["_rows_checked"] = True
            self.stats["rewrites"] += 1
            self.stats["rewrite_s"] += time.perf_counter() - t0
            self._graphs[layout] = g
            while len(self._graphs) > self.cache_size:
                self._graphs.popitem(last=False)
            return g

    @property
    def cached_layouts(self) -> List[SegmentLayout]:
        with self._lock:
            return list(self._graphs)

    def clear_cache(self) -> None:
        with self._lock:
            self._graphs.clear()

    # ------------------------------------------------------------------ call
    def forward(self, *args, **kwargs):
        prep: Prepared = self.adapter.prepare(*args, **kwargs)
        hidden = self.graph_for(prep.layout)(*prep.stack_inputs)
        return self.adapter.finish(hidden, prep)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            tower = self.__dict__.get("_modules", {}).get("tower")
            if tower is None or name.startswith("__"):
                raise
            return getattr(tower, name)

    def __getstate__(self):  # deepcopy / pickle: a lock cannot be copied; graphs and capture can
        state = self.__dict__.copy()
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__["_lock"] = threading.Lock()

    # ------------------------------------------------------------------ introspection
    def summary(self, layout: Optional[SegmentLayout] = None) -> str:
        """The adapter, the IPCV config and the rewritten graph's per-block rows (for ``layout``,
        default: the batched layout, or the most recently used packed one)."""
        lines = [f"IPCVTower[{self.adapter.describe()}]",
                 f"compile cache: {len(self._graphs)}/{self.cache_size} layouts; stats {self.stats}"]
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
