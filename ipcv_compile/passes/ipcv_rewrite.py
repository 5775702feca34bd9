"""The IPCV rewrite: a ``torch.fx`` :class:`PassBase` that runs a pipeline of small passes.

``IPCVRewritePass(gmap, config, layout)(gm)`` rewrites a captured GraphModule (dynamic token
dimension) in place, given its :class:`~ipcv_compile.locate.GraphMap` (from
:func:`ipcv_compile.locate.locate` on the same ``gm``).  It lays the config out once as a
:class:`~ipcv_core.schedule.Schedule` (one plan per block: vanilla, prune + AS, AS, prune, kept) and
runs :data:`PIPELINE` with torch.fx's :class:`PassManager`:

=====================================  =============================================================
:class:`InsertStagesPass`              one ``ipcv.prune`` per stage, at its block's input or after
                                       its attention (:mod:`.insert_stages`)
:class:`GatherSideInputsPass`          per-token side inputs gathered once per stage to its rows
:class:`KeyMetricPass`                 key-metric selections: the block's keys on the incoming rows
:class:`AttentionStabilisationPass`    AS blocks: keys / values on all rows, queries on kept rows
:class:`UseSideInputsPass`             the blocks read the side inputs at their rows
:class:`SizeBiasPass`                  merge rules tracking sizes: ``log(size)`` attention bias
:class:`SegmentAttentionPass`          every other block's attention within each segment
:class:`FollowTokenCountsPass`         reshapes follow the row count that reaches them
:class:`ReintegratePass`               the full sequence after the last block and every tap
=====================================  =============================================================

The passes share no state of their own: the :class:`~.context.RewriteContext` (graph map, schedule,
layout, report) sits in ``gm.meta`` while they run, and what one pass inserted is tagged in
``node.meta["ipcv"]`` for the next (:class:`~.context.Rewritten`).  A new graph transformation is a
new pass in :data:`PIPELINE`.  When no stage removes anything (retain 1.0) only
:class:`SegmentAttentionPass` changes the graph.

``requires`` checks that the located structure belongs to ``gm`` and fits the config's depth;
``ensures`` lints, and (``check_rows``) checks the rows every block's attention and FFN see, by
fake-tensor propagation at the example sizes, against :func:`expected_rows`.  ``node.meta["val"]``
keeps the captured shapes until ``IPCVModule.refresh_meta()`` or ``refresh=True``.
"""

from __future__ import annotations

from typing import Dict, List, Union

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from ipcv_core.config import IPCVConfig
from ipcv_core.schedule import Schedule
from ipcv_core.segments import SegmentLayout

from .. import ops as ipcv_ops
from ..graph_utils import clean_up, probe_shapes, refresh_meta
from ..locate import GraphMap
from .attention_stabilisation import AttentionStabilisationPass
from .context import RewriteContext, RewriteError, RewriteReport
from .nodes import Rewritten
from .insert_stages import InsertStagesPass
from .key_metric import KeyMetricPass, check_key_metric_cores
from .reintegrate import ReintegratePass
from .segment_attention import SegmentAttentionPass
from .side_inputs import GatherSideInputsPass, UseSideInputsPass
from .size_bias import SizeBiasPass
from .token_counts import FollowTokenCountsPass

__all__ = ["IPCVRewritePass", "RewriteError", "RewriteReport", "PIPELINE", "expected_rows", "query_rows"]

#: the passes of the rewrite, in order (each stateless: one instance serves every rewrite)
PIPELINE = (InsertStagesPass(), GatherSideInputsPass(), KeyMetricPass(), AttentionStabilisationPass(),
            UseSideInputsPass(), SizeBiasPass(), SegmentAttentionPass(), FollowTokenCountsPass(),
            ReintegratePass())


def query_rows(core: fx.Node, q_val) -> int:
    """Rows of queries an attention core computes (``ipcv.segment_attention`` in ``q_prefix`` mode
    takes the first rows of each segment of a longer ``q``)."""
    if core.target is ipcv_ops.segment_attention:
        return sum(core.kwargs["q_lengths"])
    return q_val.shape[-2]


def expected_rows(config: Union[IPCVConfig, Schedule], layout: SegmentLayout, depth: int, n_tokens: int,
                  keeps_all: bool = False) -> List[Dict[str, int]]:
    """Per block, the rows its attention queries / keys and its FFN should see after the rewrite,
    for a batch row of ``n_tokens`` tokens (static layouts: their own count): the schedule's."""
    return Schedule.build(config, depth).rows(layout, n_tokens, keeps_all)


def _run(manager: PassManager, gm: fx.GraphModule) -> None:
    """Run the pipeline; a pass's own error (a RewriteError naming the block, ...) is raised as it
    is, with the pass named in a note (the PassManager wraps it in a bare Exception)."""
    try:
        manager(gm)
    except Exception as e:  # the PassManager's wrapper: re-raise what the pass raised
        cause = e.__cause__
        if type(e) is not Exception or cause is None:
            raise
        cause.add_note(str(e))
        raise cause from None


class IPCVRewritePass(PassBase):
    """``IPCVRewritePass(gmap, config, layout)(gm) -> PassResult`` — see the module docstring.

    ``gmap`` must be the :func:`~ipcv_compile.locate.locate` result of the GraphModule the pass is
    called on; ``config`` an :class:`IPCVConfig` (fields left None: the paper's defaults, clipped)
    or a :class:`~ipcv_core.schedule.Schedule` for the graph's depth.  ``refresh=True`` brings every
    node's ``meta["val"]`` up to date afterwards (slow); ``check_rows`` makes ``ensures`` verify
    the rows each block sees (fake propagation at the example sizes, a fraction of a second on small
    graphs).  ``report``: the :class:`RewriteReport` of the latest call (also ``gm.meta["ipcv_report"]``)."""

    def __init__(self, gmap: GraphMap, config: Union[IPCVConfig, Schedule], layout: SegmentLayout, *,
                 refresh: bool = False, check_rows: bool = True):
        self.gmap = gmap
        self.schedule = Schedule.build(config, gmap.depth, taps=tuple(gmap.taps))
        self.config = self.schedule.config
        self.refresh = refresh
        self.check_rows = check_rows
        # the patch grid matters only to grid-aware variants; without them a batched layout keeps
        # one graph for every token count
        self.layout = layout if self.config.needs_grid else layout.without_grid()
        self.report = RewriteReport()

    # ------------------------------------------------------------------ checks
    def requires(self, gm: fx.GraphModule) -> None:
        gmap = self.gmap
        if gmap.hidden.graph is not gm.graph or any(b.output.graph is not gm.graph for b in gmap.blocks):
            raise RewriteError("the GraphMap was not located on this GraphModule (locate(gm, spec) first)")
        if gmap.token_symbol is None:
            raise RewriteError("the token dimension is static: capture with a dynamic token dimension")
        if self.config.needs_grid and self.layout.grids is None:
            raise RewriteError(f"selection={self.config.selection!r} / reconstruction={self.config.reconstruction!r} "
                               "need the patch grid: give SegmentLayout(grids=...) (adapters supply it per call)")
        check_key_metric_cores(self.config, gmap)  # before any pass changes the graph

    def ensures(self, gm: fx.GraphModule) -> None:
        gm.graph.lint()
        if self.check_rows:
            self._check_rows(gm)

    def _check_rows(self, gm: fx.GraphModule) -> None:
        gmap = self.gmap
        n = self._n_tokens()
        n = n if isinstance(n, int) else int(n.node.hint)
        cores = Rewritten.read(gm.graph).cores
        probes = {blk.index: (cores[blk.index][0], blk.ffn_input) for blk in gmap.blocks}
        try:
            vals = probe_shapes(gm, [a for core, f in probes.values() for a in (*core.args[:2], f)],
                                {gmap.token_symbol: n})
        except Exception as e:
            raise RewriteError(f"the rewritten graph does not run at the example sizes ({n} tokens): "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
        want = expected_rows(self.schedule, self.layout, gmap.depth, n, self.keeps_all)
        for b, (core, f) in probes.items():
            got = {"queries": query_rows(core, vals[core.args[0]]), "keys": vals[core.args[1]].shape[-2],
                   "ffn": vals[f].shape[gmap.token_dim]}
            if got != want[b]:
                raise RewriteError(f"block {b}: rows seen after the rewrite {got} differ from the schedule's {want[b]}")

    # ------------------------------------------------------------------ the rewrite
    def call(self, gm: fx.GraphModule) -> PassResult:
        self.report = RewriteReport()
        ctx = RewriteContext(gm, self.gmap, self.schedule, self.layout, self.report, self._n_tokens(),
                             self.keeps_all)
        ctx.attach()
        try:
            _run(PassManager(list(PIPELINE)), gm)
        finally:
            ctx.detach()
        return self._finish(gm)

    def _n_tokens(self):
        """Tokens of a batch row: an int for static layouts, the token symbol's size else."""
        n = self.layout.static_tokens
        return n if n is not None else self.gmap.hidden.meta["val"].shape[self.gmap.token_dim]

    @property
    def keeps_all(self) -> bool:
        """True when no stage removes anything (statically known): the rewrite is then the identity
        but for per-segment attention."""
        return self.schedule.keeps_all(self.layout, self._n_tokens())

    def _finish(self, gm: fx.GraphModule) -> PassResult:
        gmap = self.gmap
        clean_up(gm)
        n_static = self.layout.static_tokens  # a packed layout or a patch grid fixes the token count
        static = {gmap.token_symbol: n_static} if n_static is not None else None
        if self.refresh:
            refresh_meta(gm, static)
        else:  # node.meta["val"] keeps the captured shapes until IPCVModule.refresh_meta()
            gm.meta["ipcv_meta_stale"] = static if static is not None else {}
        gm.meta["ipcv_report"] = self.report
        return PassResult(gm, True)
