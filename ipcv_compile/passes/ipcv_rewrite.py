"""The IPCV rewrite pass (one pass, one file): a ``torch.fx`` :class:`PassBase`.

``IPCVRewritePass(gmap, config, layout)(gm)`` rewrites a captured GraphModule (dynamic token
dimension) in place, given its :class:`~ipcv_compile.locate.GraphMap` (from
:func:`ipcv_compile.locate.locate` on the same ``gm``).  ``requires`` checks that the located
structure belongs to ``gm`` and fits the config's depth; ``ensures`` checks the result: lint, no
reshape or op in a rewritten block still reads the stale token count, and (``check_rows``) the rows
every block's attention and FFN see, by fake-tensor propagation at the example sizes.

``call`` walks the blocks from the first prune stage on, with one :class:`Cursor` (the current
rows, the stages so far, the side inputs gathered to the current rows) and small named steps:

* :func:`insert_stage` — at the input of a stage's block: one ``ipcv.prune`` (score, per-segment
  top-K, same-segment kNN; :func:`ipcv_core.prune.prune_stage`), for key-metric selection rules the
  block's key path copied onto the incoming rows + ``ipcv.key_metric``; then
  :func:`gather_side_inputs` gathers every per-token side input (rotary cos/sin, masks) that the
  stage's kept-row blocks use, once, to the kept rows (``ipcv.gather_tokens``);
* :func:`insert_post_attention_stage` (``placement="post_attention"``, instead of
  :func:`insert_stage`) — the stage sits between the block's attention residual add and its FFN
  (:func:`attention_residual`): ``ipcv.prune`` reads the rows after the residual add and the SDPA's
  own key input (``ipcv.key_metric``, no key path copied), the FFN runs on the kept rows;
* :func:`feed_residual` — the block's residual stream becomes the current rows;
* :func:`narrow_attention` (AS blocks ``[l_p, l_p+Δ)``) — ``ipcv.reconstruct`` (NGR + restore)
  builds the full sequence, which feeds a copy of the path from the block input to the attention
  input (the pre-attention norm), so keys/values come from all rows; each SDPA's query (and its
  mask's query rows) is gathered to the kept rows, so the attention core computes ``K`` queries and
  everything after it — out projection, residual, FFN — runs on ``K`` rows;
* :func:`use_side_inputs` (other blocks after a stage) — the gathered side inputs replace the full ones;
* :func:`size_bias` (merge rules tracking sizes) — ``ipcv.attention_bias`` adds ``log(size)`` to
  every SDPA of a non-AS block after the first stage (proportional attention);
* :func:`follow_token_count` — export reads the token count once (``sym_size`` of an input) and
  feeds it to every reshape; after the prune point that count is wrong for kept rows.  Each
  reshape in a rewritten block whose shape has exactly one element derived from the token count
  gets ``-1`` there instead, so it follows whatever row count reaches it;
* :func:`reintegrate` — after the last block, ``ipcv.reconstruct`` restores the full length and
  order for the consumers of the block stack's output (final norm, merger, ...); the same after
  every *tap* (an intermediate block output the stack returns — deepstack features, a feature
  layer: one reconstruct per tap, through the stages up to that block).

Then dead-code elimination, ``graph.lint()``, ``recompile()``.  ``node.meta["val"]`` keeps the
captured shapes until ``IPCVModule.refresh_meta()`` (symbolic fake-tensor propagation, seconds on
deep towers) or ``refresh=True``.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ipcv_core.config import IPCVConfig
from ipcv_core.prune import PruneOutputs, kept_lengths, stage_plan
from ipcv_core.segments import SegmentLayout

from .. import ops as ipcv_ops
from ..graph_utils import clean_up, probe_shapes, refresh_meta
from ..locate import BlockInfo, GraphMap, descendants_within, token_symbol_dims

__all__ = ["IPCVRewritePass", "RewriteError", "RewriteReport", "Cursor", "expected_rows"]

_RESHAPES = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
}


class RewriteError(RuntimeError):
    pass


@dataclass
class RewriteReport:
    inserted: Counter = field(default_factory=Counter)  # kind of inserted node -> count
    sizes_repointed: List[str] = field(default_factory=list)
    side_inputs: Dict[str, tuple] = field(default_factory=dict)
    query_gathers: int = 0
    pre_attention_copies: int = 0
    key_copies: int = 0  # nodes copied to compute the key metric (keys before a stage)


# --------------------------------------------------------------------------------------------- cursor
@dataclass
class Cursor:
    """Where the rewrite stands while it walks the blocks."""

    g: fx.Graph
    gmap: GraphMap
    config: IPCVConfig
    layout: SegmentLayout
    report: RewriteReport
    rows: fx.Node  # the residual stream entering the current block, as rewritten
    prev_rows: fx.Node  # ... entering the previous block (eq. 1 reads both)
    stages: List[Dict[str, fx.Node]] = field(default_factory=list)  # per stage: PruneOutputs field -> node
    gathered: Dict[fx.Node, fx.Node] = field(default_factory=dict)  # side input -> at the current rows
    copies: Dict[int, List[fx.Node]] = field(default_factory=dict)  # block -> nodes the rewrite copied into it
    cores: Dict[int, List[fx.Node]] = field(default_factory=dict)  # block -> its attention cores, as rewritten
    n_tokens: object = None  # tokens of a batch row (an int for packed layouts, the token symbol's size else)
    lengths: Optional[tuple] = None  # per-segment rows of the current residual stream (None: one per row)
    as_rows: Optional[fx.Node] = None  # original positions of an AS block's rows [kept_i; removed_i] per segment
    as_gathered: Dict[fx.Node, fx.Node] = field(default_factory=dict)  # side input -> at as_rows

    def cores_of(self, blk: BlockInfo) -> List[fx.Node]:
        return self.cores.setdefault(blk.index, list(blk.attn_cores))

    def windowed(self, blk: BlockInfo) -> bool:
        spec = self.gmap.spec
        return self.layout.windows is not None and spec is not None and blk.index in spec.windowed_blocks

    def window_groups(self, rows: Optional[fx.Node]) -> fx.Node:
        """The attention window of each row (``rows``: the rows' original positions; None = all rows
        in order): a constant of the layout, gathered to the rows."""
        if getattr(self, "_wid", None) is None:
            gm = self.g.owning_module
            gm.register_buffer("ipcv_window_ids", self.layout.window_ids(self.gmap.hidden.meta["val"].device),
                               persistent=False)
            first = next(n for n in self.g.nodes if n.op != "placeholder")
            with self.g.inserting_before(first):
                self._wid = self.g.get_attr("ipcv_window_ids")
        if rows is None:
            return self._wid
        with self.g.inserting_before(rows.next):
            return self.call(ipcv_ops.gather_tokens, (self._wid, rows), dict(dims=[0], batch="none"))

    def block_nodes(self, blk: BlockInfo) -> List[fx.Node]:
        """The block's own nodes and the ones the rewrite copied into it."""
        return list(blk.nodes) + self.copies.get(blk.index, [])

    @property
    def positions(self) -> Optional[fx.Node]:
        return self.stages[-1]["positions"] if self.stages else None

    @property
    def log_size(self) -> Optional[fx.Node]:
        return self.stages[-1]["log_size"] if self.stages else None

    def order(self) -> Dict[fx.Node, int]:
        return {n: i for i, n in enumerate(self.g.nodes)}

    def call(self, op, args, kwargs=None, name: Optional[str] = None, kind: Optional[str] = None) -> fx.Node:
        """Insert ``op(*args, **kwargs)`` at the graph's insertion point, counted in the report
        (``kind``: the report's name for it, default ``ipcv_<op>``)."""
        n = self.g.call_function(op, tuple(args), kwargs or {})
        if name:
            n.name = self.g._graph_namespace.create_name(name, None)
        self.report.inserted[kind or f"ipcv_{op._opname}"] += 1
        return n

    def getitem(self, n: fx.Node, i: int) -> fx.Node:
        self.report.inserted["getitem"] += 1
        return self.g.call_function(operator.getitem, (n, i))


def _is_tok_sym(a, sym) -> bool:
    if not isinstance(a, fx.Node):
        return False
    v = a.meta.get("val")
    return isinstance(v, torch.SymInt) and sym in v.node.expr.free_symbols


def _batch_mode(val: torch.Tensor, dims, hidden_val: torch.Tensor, token_dim: int) -> str:
    """How a per-token value's dim 0 relates to the batch: ``full`` / ``broadcast`` / ``none``."""
    if token_dim == 0 or val.dim() < 2 or 0 in dims:
        return "none"
    b = val.shape[0]
    hb = hidden_val.shape[0]
    if isinstance(b, int) and b == 1 and not (isinstance(hb, int) and hb == 1):
        return "broadcast"
    if (isinstance(b, torch.SymInt) and isinstance(hb, torch.SymInt) and b.node.expr == hb.node.expr) or (
        isinstance(b, int) and isinstance(hb, int) and b == hb
    ):
        return "full"
    return "none"


def _set_mask(core: fx.Node, mask: fx.Node) -> None:
    """Give an SDPA node the ``attn_mask`` ``mask`` (positional or keyword, wherever it was)."""
    if len(core.args) > 3:
        args = list(core.args)
        args[3] = mask
        core.args = tuple(args)
    else:
        core.kwargs = {**core.kwargs, "attn_mask": mask}


def _mask_of(core: fx.Node):
    return core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")


# --------------------------------------------------------------------------------------------- steps
def gather_side_inputs(cur: Cursor, blocks: Sequence[BlockInfo], pos: fx.Node, after: fx.Node, tag: str,
                       have: Dict[fx.Node, fx.Node]) -> Dict[fx.Node, fx.Node]:
    """Side inputs used by ``blocks`` gathered once to the rows of ``pos`` (except those in ``have``),
    inserted after ``after`` (or after the side value itself when that comes later)."""
    out: Dict[fx.Node, fx.Node] = {}
    order = cur.order()
    hidden_val = cur.gmap.hidden.meta["val"]
    for blk in blocks:
        for s_ in blk.side_uses:
            if s_ in out or s_ in have:
                continue
            dims = cur.gmap.side_inputs[s_]
            mode = _batch_mode(s_.meta["val"], dims, hidden_val, cur.gmap.token_dim)
            where = cur.g.inserting_after(s_ if order.get(s_, -1) > order.get(after, 10**9) else after)
            with where:
                out[s_] = cur.call(ipcv_ops.gather_tokens, (s_, pos), dict(dims=list(dims), batch=mode),
                                   f"{s_.name}_kept{tag}")
            cur.report.side_inputs[s_.name] = dims
    return out


def insert_stage(cur: Cursor, blk: BlockInfo, stage: int) -> None:
    """One ``ipcv.prune`` at the input of ``blk``; the cursor's rows become the kept rows."""
    gmap, cfg = cur.gmap, cur.config
    metric = None
    copies: List[fx.Node] = []
    if cfg.needs_key_metric:
        side_now = dict(cur.gathered)
        if cur.positions is not None:  # side inputs at the incoming rows that are not gathered yet
            side_now.update(gather_side_inputs(cur, [blk], cur.positions, cur.positions, f"{stage}pre", side_now))
        metric, copies = _copy_key_path(cur, blk, side_now)
    kwargs = dict(stage=stage, **ipcv_ops.layout_args(cur.layout, gmap.token_dim), **ipcv_ops.config_args(cfg))
    multi = len(cfg.schedule) > 1
    with cur.g.inserting_before(blk.nodes[0]):
        node = cur.call(ipcv_ops.prune, (cur.rows, cur.prev_rows, gmap.hidden, cur.positions, metric,
                                         cur.log_size if cfg.merge_rule.tracks_sizes else None),
                        kwargs, f"ipcv_prune{stage}" if multi else "ipcv_prune")
        outs = {f: cur.getitem(node, i) for i, f in enumerate(PruneOutputs._fields)}
    cur.stages.append(outs)
    cur.lengths = kept_lengths(cur.layout, cfg, stage, cur.n_tokens)
    # side inputs of this stage's blocks at the kept rows (AS blocks' attention: see narrow_attention)
    sched = cfg.schedule
    nxt = sched[stage + 1][0] if stage + 1 < len(sched) else gmap.depth
    using = gmap.blocks[blk.index:nxt]
    last = outs[PruneOutputs._fields[-1]]
    cur.gathered = gather_side_inputs(cur, using, outs["positions"], last, str(stage), {})
    as_blocks = [b for b in using if cfg.prune_layer <= b.index < cfg.as_end]
    if as_blocks and len(sched) == 1:  # the AS rows [kept_i; removed_i] per segment, their side inputs
        with cur.g.inserting_before(last.next):
            cur.as_rows = concat_rows(cur, outs["positions"], outs["rem_idx"], 1, "ipcv_as_positions")
        cur.as_gathered = gather_side_inputs(cur, as_blocks, cur.as_rows, cur.as_rows, f"{stage}as", {})
    cur.rows = outs["x_keep"]
    cur.copies.setdefault(blk.index, []).extend(copies)


def attention_residual(cur: Cursor, blk: BlockInfo) -> fx.Node:
    """The block's residual stream after its attention (``h = x + A(x)``, what its FFN reads): the
    one residual add that depends on the attention output and that the FFN input depends on, with
    the block input reaching the rest of the block only through it (``out = h + F(h)``)."""
    within = set(cur.block_nodes(blk)) | set(cur.cores_of(blk))  # incl. cores split_attention replaced
    to_ffn = _ancestors_within(blk.ffn_input, within)
    mids = [a for a in blk.residual_adds if a in to_ffn and blk.attn_output in _ancestors_within(a, within)]
    if len(mids) != 1:
        raise RewriteError(f"block {blk.index}: a post-attention stage needs one residual add between the attention "
                           f"and the FFN (h = x + A(x); out = h + F(h)), found {[a.name for a in mids]}")
    mid = mids[0]
    before = _ancestors_within(mid, within)
    stray = [u.name for u in cur.rows.users if u in within and u not in before]
    if stray:
        raise RewriteError(f"block {blk.index}: the block input feeds {stray} besides the attention residual; a "
                           "post-attention stage needs h = x + A(x); out = h + F(h)")
    return mid


def insert_post_attention_stage(cur: Cursor, blk: BlockInfo, stage: int) -> None:
    """``placement="post_attention"``: one ``ipcv.prune`` between the block's attention residual add
    and its FFN — it scores the rows ``h = x + A(x)`` (eq. 1 reads ``x``, the block input, as the
    previous rows) and, for key-metric selections, matches on the SDPA's own key input
    (``ipcv.key_metric``; no key projection is added); the FFN and the rest of the block, the later
    blocks and the side inputs they read, follow the kept rows."""
    gmap, cfg, g = cur.gmap, cur.config, cur.g
    mid = attention_residual(cur, blk)
    kwargs = dict(stage=stage, **ipcv_ops.layout_args(cur.layout, gmap.token_dim), **ipcv_ops.config_args(cfg))
    multi = len(cfg.schedule) > 1
    with g.inserting_before(mid.next):  # new nodes in order, right after the residual add
        metric = None
        if cfg.needs_key_metric:
            metric = cur.call(ipcv_ops.key_metric, (cur.cores_of(blk)[0].args[1],), name=f"ipcv_keys{blk.index}")
        node = cur.call(ipcv_ops.prune, (mid, cur.rows, gmap.hidden, cur.positions, metric,
                                         cur.log_size if cfg.merge_rule.tracks_sizes else None),
                        kwargs, f"ipcv_prune{stage}" if multi else "ipcv_prune")
        outs = {f: cur.getitem(node, i) for i, f in enumerate(PruneOutputs._fields)}
    mid.replace_all_uses_with(outs["x_keep"], delete_user_cb=lambda u: u is not node)
    cur.stages.append(outs)
    cur.lengths = kept_lengths(cur.layout, cfg, stage, cur.n_tokens)
    sched = cfg.schedule
    nxt = sched[stage + 1][0] if stage + 1 < len(sched) else gmap.depth
    last = outs[PruneOutputs._fields[-1]]
    # the kept rows feed this block's FFN, the blocks up to the next stage and that stage's attention
    gathered = gather_side_inputs(cur, gmap.blocks[blk.index:nxt + 1], outs["positions"], last, str(stage), {})
    # the rest of this block (its FFN) reads the side inputs at the kept rows; later blocks via use_side_inputs
    rest = descendants_within(outs["x_keep"], set(blk.nodes))
    for n in rest:
        for s_, s_k in gathered.items():
            if s_ in n.all_input_nodes:
                n.replace_input_with(s_, s_k)
    cur.gathered = gathered
    cur.rows = outs["x_keep"]


def feed_residual(cur: Cursor, blk: BlockInfo) -> None:
    """The block reads the cursor's rows as its residual stream."""
    for n in blk.nodes:
        n.replace_input_with(blk.input, cur.rows)


def reconstruct_all(cur: Cursor, rows: fx.Node, where, name: str) -> fx.Node:
    """``ipcv.reconstruct`` of ``rows`` (the last stage's kept rows at some layer) through every stage."""
    flat = [st[f] for st in cur.stages for f in ipcv_ops.RECONSTRUCT_FIELDS]
    with where:
        return cur.call(ipcv_ops.reconstruct, (rows, flat), dict(token_dim=cur.gmap.token_dim), name)


def _copy_attention_input(cur: Cursor, blk: BlockInfo, x_all: fx.Node) -> fx.Node:
    """The path block input -> attention input (e.g. the pre-attention norm) copied onto ``x_all``;
    every attention node then reads the copy."""
    g, rows = cur.g, cur.rows
    if blk.attn_input is rows:
        full_attn_in = x_all
    else:
        env = {rows: x_all}
        with g.inserting_before(blk.attn_input.next):  # every input of the path is defined by then
            for n in _path_between(rows, blk.attn_input, blk.nodes):
                c = g.node_copy(n, lambda a: env.get(a, a))
                c.meta = dict(n.meta)
                env[n] = c
                cur.copies.setdefault(blk.index, []).append(c)
                cur.report.pre_attention_copies += 1
        full_attn_in = env[blk.attn_input]
    for n in blk.attn_nodes:
        n.replace_input_with(blk.attn_input, full_attn_in)
    return full_attn_in


def _token_mask_dims(cur: Cursor, mask) -> tuple:
    if not isinstance(mask, fx.Node):
        return ()
    mv = mask.meta["val"]
    return tuple(d for d in (mv.dim() - 2, mv.dim() - 1) if d in token_symbol_dims(mv, cur.gmap.token_symbol))


def narrow_attention(cur: Cursor, blk: BlockInfo) -> None:
    """AS block: keys/values over all rows (kept + NGR-reconstructed), queries for the kept rows.

    One stage (the paper's method): the removed rows' values come from ``ipcv.ngr`` alone and join
    the kept rows per segment as ``[kept_i; removed_i]`` (``ipcv.segment_concat``, no scatter into
    the original order: attention does not depend on the order of its keys); the side inputs of the
    attention follow that order (gathered once per stage, :attr:`Cursor.as_rows`); the queries are
    the first ``K_i`` rows of each segment (``q_prefix``; a slice for one segment per row).
    Several stages: the full sequence is restored in original order (``ipcv.reconstruct``) and the
    queries gathered to the kept rows."""
    g, rows, td = cur.g, cur.rows, cur.gmap.token_dim
    full = cur.layout.lengths
    if len(cur.stages) > 1:
        x_all = reconstruct_all(cur, rows, g.inserting_before(blk.nodes[0]), f"ipcv_reconstruct_as{blk.index}")
        _copy_attention_input(cur, blk, x_all)
        pos, hidden_val = cur.positions, cur.gmap.hidden.meta["val"]
        for core in cur.cores_of(blk):
            q = core.args[0]
            with g.inserting_before(core):
                qk = cur.call(ipcv_ops.gather_tokens, (q, pos), dict(dims=[q.meta["val"].dim() - 2], batch="full"))
                cur.report.query_gathers += 1
                core.args = (qk,) + tuple(core.args[1:])
                mask = _mask_of(core)
                if mask is not None and (mask.meta["val"].dim() - 2) in _token_mask_dims(cur, mask):
                    mv = mask.meta["val"]
                    mode = _batch_mode(mv, (mv.dim() - 2,), hidden_val, td)
                    _set_mask(core, cur.call(ipcv_ops.gather_tokens, (mask, pos), dict(dims=[mv.dim() - 2], batch=mode)))
        split_attention(cur, blk, cur.lengths, full, q_rows=cur.positions)
        return
    st = cur.stages[-1]
    with g.inserting_before(blk.nodes[0]):
        rec = cur.call(ipcv_ops.ngr_rows, (rows, st["x_rem"], st["x_keep"], st["nbr_idx"], st["nbr_w"]),
                       dict(token_dim=td), f"ipcv_ngr_as{blk.index}")
        x_all = concat_rows(cur, rows, rec, td, f"ipcv_rows_as{blk.index}")
    full_attn_in = _copy_attention_input(cur, blk, x_all)
    # the attention's side inputs (rotary tables, masks) at the AS rows' order; a mask's query dim
    # (for the one-segment-per-row slice below)
    mask_qdim = {}
    for core in cur.cores_of(blk):
        m = _mask_of(core)
        if isinstance(m, fx.Node) and (m.meta["val"].dim() - 2) in _token_mask_dims(cur, m):
            mask_qdim[core] = m.meta["val"].dim() - 2
    # (not the key-path copies a key-metric stage made before its prune: they read the incoming rows)
    order = cur.order()
    prune_at = order[st["x_keep"].args[0]]
    for n in list(blk.attn_nodes) + [c for c in cur.copies.get(blk.index, []) if order[c] > prune_at]:
        for s_, s_k in cur.as_gathered.items():
            if s_ in n.all_input_nodes:
                n.replace_input_with(s_, s_k)
    prefix = []
    for core in cur.cores_of(blk):
        if not narrow_queries(cur, blk, core, full_attn_in):
            prefix.append(core)
        elif core in mask_qdim:  # compact queries: the mask's query rows too
            with g.inserting_before(core):
                _set_mask(core, _prefix_rows(cur, _mask_of(core), mask_qdim[core], f"{core.name}_mask_kept"))
    if full is None:  # one segment per row: the kept rows are the first K of every row
        for core in prefix:
            q = core.args[0]
            with g.inserting_before(core):
                k_rows = g.call_function(torch.ops.aten.sym_size.int, (rows, td))
                core.args = (g.call_function(torch.ops.aten.slice.Tensor, (q, q.meta["val"].dim() - 2, 0, k_rows)),) \
                    + tuple(core.args[1:])
                if core in mask_qdim:
                    _set_mask(core, g.call_function(torch.ops.aten.slice.Tensor, (_mask_of(core), mask_qdim[core], 0, k_rows)))
            cur.report.query_gathers += 1
    else:
        split_attention(cur, blk, cur.lengths, full, q_prefix=True, only=prefix, kv_rows=cur.as_rows)
        split_attention(cur, blk, cur.lengths, full, q_prefix=False, only=[c for c in cur.cores_of(blk) if c not in prefix],
                        q_rows=cur.positions, kv_rows=cur.as_rows)


_MOVES = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.unbind.int,
    torch.ops.aten.select.int, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
    torch.ops.aten.slice.Tensor, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default,
    operator.getitem,
}


def _kept_rows_of(cur: Cursor, a: fx.Node, name: str) -> Optional[fx.Node]:
    """The kept rows of a value computed on an AS block's rows (``[kept_i; removed_i]`` per
    segment): the first ``K_i`` rows of each segment along its one token dim."""
    val = a.meta.get("val")
    dims = token_symbol_dims(val, cur.gmap.token_symbol) if isinstance(val, torch.Tensor) else ()
    if len(dims) != 1:
        return None
    return _prefix_rows(cur, a, dims[0], name)


def _prefix_rows(cur: Cursor, a: fx.Node, dim: int, name: str) -> fx.Node:
    """The first ``K_i`` rows of each segment of ``a`` along ``dim`` (a slice for one segment per row)."""
    if cur.layout.lengths is None:
        k_rows = cur.g.call_function(torch.ops.aten.sym_size.int, (cur.rows, cur.gmap.token_dim))
        return cur.g.call_function(torch.ops.aten.slice.Tensor, (a, dim, 0, k_rows))
    return cur.call(ipcv_ops.segment_prefix_op, (a,), dict(lengths=list(cur.layout.lengths), take=list(cur.lengths),
                                                          dim=dim), name)


def narrow_queries(cur: Cursor, blk: BlockInfo, core: fx.Node, full_attn_in: fx.Node) -> bool:
    """AS block, one stage: the nodes only the query depends on (q projection, its rotary, ...)
    run on the kept rows only.  Where the query path leaves a value shared with keys / values, it
    takes that value's kept rows (the kept attention input itself, or the first ``K_i`` rows of each
    segment); its side inputs become the kept rows' ones.  A fused q/k/v projection is split by
    :func:`_split_fused_projection` so that q is projected for kept rows only.  Returns False (and
    changes nothing) when the query shares its whole path with the keys."""
    nodes = set(blk.attn_nodes) | set(cur.copies.get(blk.index, []))
    q, k, v = core.args[:3]
    kv_anc = _ancestors_within(k, nodes) | _ancestors_within(v, nodes)
    q_only = _ancestors_within(q, nodes) - kv_anc
    # a multi-output value (unbind, split) is not a row tensor: the query starts at its getitem
    starts = {n for n in q_only if any(isinstance(a.meta.get("val"), (tuple, list)) and a not in q_only
                                       for a in n.all_input_nodes)}
    q_only -= starts
    if not q_only:
        return False
    side_as = {s_k: s_ for s_, s_k in cur.as_gathered.items()}
    kept_of: Dict[fx.Node, fx.Node] = {}
    kept_attn_in = cur.rows if blk.attn_input is cur.rows else blk.attn_input
    order = cur.order()
    for n in sorted(q_only, key=order.get):
        for a in list(n.all_input_nodes):
            if a in q_only:
                continue
            if a in side_as:
                n.replace_input_with(a, cur.gathered[side_as[a]])
                continue
            if a is full_attn_in:
                n.replace_input_with(a, kept_attn_in)
                continue
            if a not in kept_of:
                with cur.g.inserting_before(a.next):  # (inserting_after would reverse several new nodes)
                    kr = _kept_rows_of(cur, a, f"{a.name}_kept")
                if kr is None:
                    continue  # not a row value (weights, sizes)
                kept_of[a] = kr
                _split_fused_projection(cur, blk, a, full_attn_in, kept_attn_in)
            n.replace_input_with(a, kept_of[a])
    cur.report.query_gathers += 1
    return True


def _split_fused_projection(cur: Cursor, blk: BlockInfo, start: fx.Node, full_attn_in: fx.Node,
                            kept_attn_in: fx.Node) -> None:
    """``start`` (the query's slice of a fused q/k/v projection, reached from it by reshapes /
    permutes / unbind only): project q for the kept rows only — the fused linear becomes
    ``linear(kept, W_q)`` (placed at the kept rows, zeros at the removed ones) concatenated with
    ``linear(all, W_kv)``.  The q columns are found by running the path on column indices."""
    g = cur.g
    lins = [n for n in blk.attn_nodes if n.target is torch.ops.aten.linear.default and n.args[0] is full_attn_in]
    if len(lins) != 1:
        return
    lin = lins[0]
    path = [lin] + _path_between(lin, start, blk.attn_nodes)
    if path[-1] is not start or any(n.target not in _MOVES for n in path[1:]):
        return
    cols = _probe_columns(cur, path)
    if cols is None:
        return
    c0, c1 = cols
    w, b = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
    with g.inserting_before(lin):
        def piece(t, lo, hi):
            return g.call_function(torch.ops.aten.slice.Tensor, (t, 0, lo, hi))

        width = _out_features(cur, lin)
        keep_cols = [(0, c0), (c1, width)]
        w_rest = [piece(w, lo, hi) for lo, hi in keep_cols if hi > lo]
        b_rest = [piece(b, lo, hi) for lo, hi in keep_cols if hi > lo] if b is not None else None
        w_rest = w_rest[0] if len(w_rest) == 1 else g.call_function(torch.ops.aten.cat.default, (w_rest, 0))
        if b_rest is not None:
            b_rest = b_rest[0] if len(b_rest) == 1 else g.call_function(torch.ops.aten.cat.default, (b_rest, 0))
        q_lin = g.call_function(torch.ops.aten.linear.default, (kept_attn_in, piece(w, c0, c1),
                                                                 piece(b, c0, c1) if b is not None else None))
        rest = g.call_function(torch.ops.aten.linear.default, (full_attn_in, w_rest, b_rest))
        td = cur.gmap.token_dim
        n_kept = g.call_function(torch.ops.aten.sym_size.int, (cur.rows, td))
        rem_rows = g.call_function(torch.ops.aten.slice.Tensor, (rest, td, n_kept, None))
        zeros = g.call_function(torch.ops.aten.zeros_like.default,
                                (g.call_function(torch.ops.aten.slice.Tensor, (rem_rows, -1, 0, c1 - c0)),))
        q_pad = concat_rows(cur, q_lin, zeros, td, f"{lin.name}_q")
        parts = [q_pad, rest] if c0 == 0 else [g.call_function(torch.ops.aten.slice.Tensor, (rest, -1, 0, c0)), q_pad,
                                               g.call_function(torch.ops.aten.slice.Tensor, (rest, -1, c0, None))]
        fused = g.call_function(torch.ops.aten.cat.default, (parts, -1))
    lin.replace_all_uses_with(fused)
    cur.report.inserted["q_projection_split"] += 1


def _out_features(cur: Cursor, lin: fx.Node) -> int:
    w = lin.args[1]
    val = w.meta.get("val")
    if val is None and w.op == "get_attr":
        val = cur.g.owning_module.get_parameter(w.target)
    return int(val.shape[0])


def _probe_columns(cur: Cursor, path: List[fx.Node]):
    """Run ``path`` (a linear, then data movement only) on a tensor whose entries are their column
    index; the query's columns, if they form one block ``[c0, c1)``."""
    lin = path[0]
    width = _out_features(cur, lin)
    sym = cur.gmap.token_symbol
    for rows in (7, 11, 13):
        env = {lin: torch.arange(width, dtype=torch.float32).expand(rows, width).clone()}
        if cur.gmap.token_dim == 1:
            env[lin] = env[lin].unsqueeze(0)

        def arg(a):
            if isinstance(a, fx.Node):
                if a in env:
                    return env[a]
                if _is_tok_sym(a, sym):
                    return rows
                raise KeyError(a.name)
            return a

        try:
            for n in path[1:]:
                env[n] = n.target(*fx.node.map_aggregate(n.args, arg), **fx.node.map_aggregate(n.kwargs, arg))
        except Exception:
            return None
        out = env[path[-1]]
        if not isinstance(out, torch.Tensor) or list(out.shape).count(rows) != 1:
            continue
        cols = sorted({int(c) for c in out.unique().tolist()})
        if cols == list(range(cols[0], cols[-1] + 1)):
            return cols[0], cols[-1] + 1
        return None
    return None


def concat_rows(cur: Cursor, kept: fx.Node, removed: fx.Node, dim: int, name: str) -> fx.Node:
    """The kept and the removed rows of the last stage, per segment ``[kept_i; removed_i]``."""
    full = cur.layout.lengths
    if full is None:
        n = cur.g.call_function(torch.ops.aten.cat.default, ([kept, removed], dim))
        n.name = cur.g._graph_namespace.create_name(name, None)
        return n
    kept_l = cur.lengths
    return cur.call(ipcv_ops.segment_concat_op, (kept, removed),
                    dict(a_lengths=list(kept_l), b_lengths=[n - k for n, k in zip(full, kept_l)], dim=dim), name)


def split_attention(cur: Cursor, blk: BlockInfo, q_lengths, kv_lengths, q_prefix: bool = False, only=None,
                    q_rows: Optional[fx.Node] = None, kv_rows: Optional[fx.Node] = None) -> None:
    """Packed rows: every SDPA of the block becomes ``ipcv.segment_attention`` over the static
    segment lengths — each image / frame attends to its own rows only, no mask spans two segments
    (equal runs of segments are one batched SDPA).  One segment per row: nothing to do.

    Windowed blocks (``LocateSpec.windowed_blocks`` with ``SegmentLayout.windows``): rows in their
    original order attend per window (the windows are the segments); rows after a prune stage
    (``q_rows`` / ``kv_rows``: their original positions, None = all rows in order) attend per frame
    among the rows of their own window (``q_groups`` / ``kv_groups``)."""
    groups = None
    if cur.windowed(blk):
        if q_rows is None and kv_rows is None and not q_prefix:
            q_lengths = kv_lengths = tuple(w for ws in cur.layout.windows for w in ws)
        else:
            groups = (None if q_prefix else cur.window_groups(q_rows), cur.window_groups(kv_rows))
    if q_lengths is None or (len(q_lengths) == 1 and not q_prefix and groups is None):
        return
    new_cores = []
    for core in cur.cores_of(blk):
        if only is not None and core not in only:
            new_cores.append(core)
            continue
        q, k, v = core.args[:3]
        kw = dict(core.kwargs)
        extra = dict(zip(("attn_mask", "dropout_p", "is_causal"), core.args[3:]))
        kw.update(extra)
        if kw.get("dropout_p", 0.0) or kw.get("is_causal", False):
            raise RewriteError(f"{core.name}: per-segment attention needs dropout_p=0 and is_causal=False")
        with cur.g.inserting_before(core):
            seg = cur.call(ipcv_ops.segment_attention_op, (q, k, v, kw.get("attn_mask"), *(groups or (None, None))),
                           dict(q_lengths=list(q_lengths), kv_lengths=list(kv_lengths), q_prefix=q_prefix,
                                scale=kw.get("scale"), enable_gqa=bool(kw.get("enable_gqa", False))))
        seg.meta = dict(core.meta)
        seg.meta["ipcv"] = dict(core.meta.get("ipcv", {}), role="attention_core")
        core.replace_all_uses_with(seg)
        cur.g.erase_node(core)
        new_cores.append(seg)
    cur.cores[blk.index] = new_cores


def use_side_inputs(cur: Cursor, blk: BlockInfo, exclude=()) -> None:
    """A kept-rows block (or the kept-row part of an AS block: ``exclude`` its attention) reads the
    side inputs gathered to the current rows.  Only the block's own nodes: copies made by the
    rewrite (key path on the incoming rows, AS path on all rows) read their own."""
    skip = set(exclude)
    for n in blk.nodes:
        if n in skip:
            continue
        for s_, s_k in cur.gathered.items():
            if s_ in n.all_input_nodes:
                n.replace_input_with(s_, s_k)


def size_bias(cur: Cursor, blk: BlockInfo) -> None:
    """Proportional attention: every SDPA of the block adds ``log(size)`` of its keys."""
    for core in cur.cores_of(blk):
        with cur.g.inserting_before(core):
            bias = cur.call(ipcv_ops.attention_bias, (_mask_of(core), cur.log_size),
                            dict(dtype=core.args[0].meta["val"].dtype))
        _set_mask(core, bias)


def follow_token_count(cur: Cursor, blk: BlockInfo) -> None:
    """Reshapes in the block follow the row count that reaches them (``-1`` for the token count)."""
    sym = cur.gmap.token_symbol
    for n in cur.block_nodes(blk):
        if n.op != "call_function":
            continue
        if n.target in _RESHAPES:
            shape = list(n.args[1])
            hits = [i for i, a in enumerate(shape) if _is_tok_sym(a, sym)]
            if not hits:
                continue
            val = n.meta.get("val")
            # an inferred size (-1) already present is pinned to its static value first
            # (transformers reshapes as view(*x.shape[:-1], -1, head_dim))
            for i, a in enumerate(shape):
                if isinstance(a, int) and a == -1:
                    if isinstance(val, torch.Tensor) and len(val.shape) == len(shape) and isinstance(val.shape[i], int):
                        shape[i] = int(val.shape[i])
                    else:
                        raise RewriteError(
                            f"{n.name} ({n.target}) infers a non-static size (-1) besides the token count in "
                            f"{list(n.args[1])}; cannot make it follow the kept-token count"
                        )
            if len(hits) > 1:
                raise RewriteError(
                    f"{n.name} ({n.target}) has {len(hits)} sizes derived from the token count in {list(n.args[1])}; "
                    "cannot make it follow the kept-token count"
                )
            shape[hits[0]] = -1
            n.args = (n.args[0], shape) + tuple(n.args[2:])
            cur.report.sizes_repointed.append(n.name)
            continue
        _check_no_token_size(n, sym)


def _check_no_token_size(n: fx.Node, sym) -> None:
    if n.op != "call_function" or n.target is torch.ops.aten.sym_size.int:
        return  # sym_size reads the size of a local tensor: always right
    bad = [a for a in n.all_input_nodes if _is_tok_sym(a, sym)]
    if bad:
        raise RewriteError(
            f"{n.name} ({n.target}) takes a size derived from the token count ({[b.name for b in bad]}); "
            "the rewrite cannot make it follow the kept-token count"
        )


def reintegrate(cur: Cursor, blk: Optional[BlockInfo] = None) -> None:
    """The full length and original order for the consumers outside the block stack of the last
    block's output — or of ``blk``'s, a tap (an intermediate block output the stack returns:
    deepstack features, feature layers), restored through the stages so far."""
    if not cur.config.reintegrate:
        return
    last = (blk or cur.gmap.blocks[-1]).output
    users = list(cur.gmap.final_users if blk is None else cur.gmap.taps.get(blk.index, []))
    if users:
        name = "ipcv_reconstruct" if blk is None else f"ipcv_reconstruct_tap{blk.index}"
        full = reconstruct_all(cur, last, cur.g.inserting_before(last.next), name)
        for u in users:
            u.replace_input_with(last, full)


def _copy_key_path(cur: Cursor, blk: BlockInfo, side_map: Dict[fx.Node, fx.Node]):
    """Key-metric selection rules: the block's attention keys on the rows entering it (before the
    stage prunes them), head-averaged — a copy of every node of the block the SDPA key depends on,
    reading the cursor's rows and ``side_map`` (side inputs at those rows), inserted before the
    block.  For a fused qkv projection the copy computes q and v too.  Returns ``(metric, copies)``."""
    g = cur.g
    if len(blk.attn_cores) != 1:
        raise RewriteError(f"selection={cur.config.selection!r} needs exactly one attention core (SDPA) in block "
                           f"{blk.index}, found {len(blk.attn_cores)}")
    old_in = blk.input
    key = blk.attn_cores[0].args[1]
    anc = _ancestors_within(key, set(blk.nodes))
    if old_in not in {a for n in anc for a in n.all_input_nodes}:
        raise RewriteError(f"block {blk.index}: the attention keys do not depend on the block input")
    env = {old_in: cur.rows, **side_map}
    # values the key path reads from outside the block (e.g. rotary tables computed late in the
    # graph) must exist before the copies: move them (with their own late inputs) up
    at = blk.nodes[0]
    order = cur.order()

    def hoist(n):
        if order[n] < order[at]:
            return
        if n is old_in or n is cur.rows or n in anc or descendants_within(old_in, {n}):
            raise RewriteError(f"block {blk.index}: the key path reads {n.name}, computed after the block starts")
        for a in n.all_input_nodes:
            hoist(a)
        at.prepend(n)
        order[n] = order[at] - 0.5

    for n in anc:
        for a in n.all_input_nodes:
            if a not in anc:
                hoist(env.get(a, a))
    copies = []
    with g.inserting_before(blk.nodes[0]):
        for n in blk.nodes:
            if n not in anc:
                continue
            c = g.node_copy(n, lambda a: env.get(a, a))
            c.meta = dict(n.meta)
            env[n] = c
            copies.append(c)
            cur.report.key_copies += 1
        metric = cur.call(ipcv_ops.key_metric, (env[key],), name=f"ipcv_keys{blk.index}")
    return metric, copies


def _path_between(src: fx.Node, dst: fx.Node, nodes) -> List[fx.Node]:
    """Nodes of ``nodes`` (in graph order) on some path from ``src`` to ``dst`` (``dst`` included)."""
    node_set = set(nodes)
    anc = _ancestors_within(dst, node_set)
    desc = descendants_within(src, node_set)
    return [n for n in nodes if n in anc and n in desc]


def _ancestors_within(dst: fx.Node, within: set) -> set:
    """Nodes of ``within`` that ``dst`` depends on through nodes of ``within`` (``dst`` included)."""
    anc, stack = set(), [dst]
    while stack:
        n = stack.pop()
        if n in anc or n not in within:
            continue
        anc.add(n)
        stack.extend(n.all_input_nodes)
    return anc


# --------------------------------------------------------------------------------------------- the pass
def query_rows(core: fx.Node, q_val) -> int:
    """Rows of queries an attention core computes (``ipcv.segment_attention`` in ``q_prefix`` mode
    takes the first rows of each segment of a longer ``q``)."""
    if core.target is ipcv_ops.segment_attention_op:
        return sum(core.kwargs["q_lengths"])
    return q_val.shape[-2]


def expected_rows(config: IPCVConfig, layout: SegmentLayout, depth: int, n_tokens: int,
                  keeps_all: bool = False) -> List[Dict[str, int]]:
    """Per block, the rows its attention queries / keys and its FFN should see after the rewrite,
    for a batch row of ``n_tokens`` tokens (static layouts: their own count)."""
    stage_of = {} if keeps_all else {layer: i for i, (layer, _) in enumerate(config.schedule)}
    post = config.post_attention
    rows, out = n_tokens, []
    for b in range(depth):
        before = rows
        if b in stage_of:
            rows = stage_plan(layout, config, stage_of[b], n_tokens).n_keep
        as_block = config.prune_layer <= b < config.as_end and not keeps_all
        if post:  # the stage sits between the attention and the FFN
            out.append({"queries": before, "keys": before, "ffn": rows})
        else:
            out.append({"queries": rows, "keys": n_tokens if as_block else rows, "ffn": rows})
    return out


class IPCVRewritePass(PassBase):
    """``IPCVRewritePass(gmap, config, layout)(gm) -> PassResult`` — see the module docstring.

    ``gmap`` must be the :func:`~ipcv_compile.locate.locate` result of the GraphModule the pass is
    called on.  ``refresh=True`` brings every node's ``meta["val"]`` up to date afterwards (slow);
    ``check_rows`` makes ``ensures`` verify the rows each block sees (fake propagation at the
    example sizes, a fraction of a second on small graphs)."""

    def __init__(self, gmap: GraphMap, config: IPCVConfig, layout: SegmentLayout, *, refresh: bool = False,
                 check_rows: bool = True):
        self.gmap = gmap
        self.config = config.resolve(gmap.depth)  # fields left None: the paper's defaults, clipped
        config = self.config
        self.refresh = refresh
        self.check_rows = check_rows
        # the patch grid matters only to grid-aware variants; without them a batched layout keeps
        # one graph for every token count
        self.layout = layout if config.needs_grid else layout.without_grid()
        self.report = RewriteReport()
        self._cursor: Optional[Cursor] = None

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
        if self.config.needs_key_metric:
            for blk in gmap.blocks:
                if len(blk.attn_cores) != 1:
                    raise RewriteError(f"selection={self.config.selection!r} needs exactly one attention core (SDPA) "
                                       f"in block {blk.index}, found {len(blk.attn_cores)}")

    def ensures(self, gm: fx.GraphModule) -> None:
        gm.graph.lint()
        first = self.config.schedule[0][0] if not self.keeps_all else self.gmap.depth
        sym = self.gmap.token_symbol
        live = set(gm.graph.nodes)
        for blk in self.gmap.blocks[first:]:
            for n in self._cursor.block_nodes(blk):
                if n in live and not (n.op == "call_function" and n.target in _RESHAPES):
                    _check_no_token_size(n, sym)
                elif n in live and any(_is_tok_sym(a, sym) for a in n.args[1]):
                    raise RewriteError(f"{n.name} still reshapes to the captured token count")
        if self.check_rows:
            self._check_rows(gm)

    def _check_rows(self, gm: fx.GraphModule) -> None:
        gmap, cur = self.gmap, self._cursor
        n_static = self.layout.static_tokens
        n = n_static if n_static is not None else int(gmap.hidden.meta["val"].shape[gmap.token_dim].node.hint)
        probes = {blk.index: (cur.cores_of(blk)[0], blk.ffn_input) for blk in gmap.blocks}
        try:
            vals = probe_shapes(gm, [a for core, f in probes.values() for a in (*core.args[:2], f)],
                                {gmap.token_symbol: n})
        except Exception as e:
            raise RewriteError(f"the rewritten graph does not run at the example sizes ({n} tokens): "
                               f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
        want = expected_rows(self.config, self.layout, gmap.depth, n, self.keeps_all)
        for b, (core, f) in probes.items():
            got = {"queries": query_rows(core, vals[core.args[0]]), "keys": vals[core.args[1]].shape[-2],
                   "ffn": vals[f].shape[gmap.token_dim]}
            if got != want[b]:
                raise RewriteError(f"block {b}: rows seen after the rewrite {got} differ from the schedule's {want[b]}")

    # ------------------------------------------------------------------ the rewrite
    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg, gmap, layout = self.config, self.gmap, self.layout
        first = cfg.schedule[0][0]
        stage_of = {layer: i for i, (layer, _) in enumerate(cfg.schedule)}
        n_tokens = layout.static_tokens if layout.static_tokens is not None else \
            gmap.hidden.meta["val"].shape[gmap.token_dim]
        cur = self._cursor = Cursor(gm.graph, gmap, cfg, layout, self.report, rows=gmap.blocks[first].input,
                                    prev_rows=gmap.blocks[max(first - 1, 0)].input, n_tokens=n_tokens,
                                    lengths=layout.lengths)
        if self.keeps_all:  # nothing is removed (retain 1.0): only attention within each segment
            for blk in gmap.blocks:
                split_attention(cur, blk, layout.lengths, layout.lengths)
            return self._finish(gm)
        for blk in gmap.blocks[:first]:
            split_attention(cur, blk, layout.lengths, layout.lengths)
        post = cfg.post_attention
        for blk in gmap.blocks[first:]:
            if blk.index in stage_of and not post:
                insert_stage(cur, blk, stage_of[blk.index])
            feed_residual(cur, blk)
            if cfg.prune_layer <= blk.index < cfg.as_end:
                narrow_attention(cur, blk)
                use_side_inputs(cur, blk, exclude=blk.attn_nodes)
            else:
                use_side_inputs(cur, blk)
                if cfg.merge_rule.attention_bias and cur.stages:
                    size_bias(cur, blk)
                split_attention(cur, blk, cur.lengths, cur.lengths, q_rows=cur.positions, kv_rows=cur.positions)
                if blk.index in stage_of and post:
                    insert_post_attention_stage(cur, blk, stage_of[blk.index])
            follow_token_count(cur, blk)
            if blk.index in gmap.taps:
                reintegrate(cur, blk)
            cur.prev_rows, cur.rows = cur.rows, blk.output
        reintegrate(cur)
        return self._finish(gm)

    @property
    def keeps_all(self) -> bool:
        """True when no stage removes anything (statically known): the rewrite is then the identity
        but for per-segment attention."""
        n = self.layout.static_tokens
        n = n if n is not None else self.gmap.hidden.meta["val"].shape[self.gmap.token_dim]
        return all(stage_plan(self.layout, self.config, i, n).keeps_all for i in range(len(self.config.schedule)))

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
