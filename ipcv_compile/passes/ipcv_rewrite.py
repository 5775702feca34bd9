"""The IPCV rewrite pass (one pass, one file).

Input: a captured GraphModule (dynamic token dimension) and its :class:`GraphMap` from
:func:`ipcv_compile.locate.locate`.  Output: the same GraphModule, rewritten in place:

* at the input of block ``l_p``: one ``ipcv_prune`` call (score eq. 1, per-segment top-K,
  same-segment kNN) and, for every per-token side input used by the blocks after the AS range,
  one ``ipcv_gather_tokens`` call;
* blocks ``>= l_p`` take the kept rows as their residual stream;
* AS blocks ``[l_p, l_p+Δ)``: ``ipcv_reconstruct`` (NGR + restore) builds the full sequence, which
  feeds a copy of the path from the block input to the attention input (the pre-attention norm),
  so keys/values come from all rows; each SDPA node's query (and its mask's query rows) is gathered
  to the kept rows, so the attention core computes ``K`` queries and everything after it — out
  projection, residual, FFN — runs on ``K`` rows;
* blocks ``>= l_p+Δ`` use the gathered side inputs;
* after the last block: ``ipcv_reconstruct`` restores the full length and order for the consumers
  of the block stack's output (final norm, merger, ...).

With a multi-stage schedule (``IPCVConfig.stages``) every stage inserts its own ``ipcv_prune`` on
the current rows, blocks between stages run on that stage's rows with side inputs gathered to them,
and reconstruction goes through every stage, innermost first.  Merge variants add ``log(size)``
(sizes accumulated over stages) to the attention of every non-AS block after the first stage.
``selection="bipartite"`` needs each stage's block keys on the rows entering it: every node of the
block that the SDPA key depends on is copied before the stage, reading the incoming rows (and side
inputs gathered to them), and ``ipcv_key_metric`` averages the heads — for a fused qkv projection
the copy computes q and v too (the cost of one projection of the incoming rows per stage).

Sizes: export reads the token count once (``sym_size`` of an input) and feeds it to every reshape;
after the prune point that count is wrong for kept rows.  Each reshape/view in a rewritten block
whose shape has exactly one element derived from the token count gets ``-1`` there instead, so it
follows whatever row count reaches it (kept rows or the full sequence).  Any other op in those
blocks that takes a token-count-derived size raises :class:`RewriteError`.

Then: dead-code elimination, ``graph.lint()``, ``recompile()``; with ``refresh=True`` also
fake-tensor propagation so every node's ``meta["val"]`` shows its new (symbolic) shape (slow on
deep towers: seconds; by default it is deferred to ``IPCVModule.refresh_meta()``, which the
summary and the TensorRT check call).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import fx

from ipcv_core.config import IPCVConfig
from ipcv_core.segments import SegmentLayout

from .. import ops as ipcv_ops
from ..graph_utils import PassResult, clean_up, refresh_meta
from ..locate import GraphMap, descendants_within, token_symbol_dims

__all__ = ["IPCVRewritePass", "RewriteError", "RewriteReport"]

_RESHAPES = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
}


class RewriteError(RuntimeError):
    pass


@dataclass
class RewriteReport:
    inserted: Counter = field(default_factory=Counter)  # op name -> count of inserted nodes
    sizes_repointed: List[str] = field(default_factory=list)
    side_inputs: Dict[str, tuple] = field(default_factory=dict)
    query_gathers: int = 0
    pre_attention_copies: int = 0
    key_copies: int = 0  # nodes copied to compute the bipartite metric (keys before a stage)


def _is_tok_sym(a, sym) -> bool:
    if not isinstance(a, fx.Node):
        return False
    v = a.meta.get("val")
    return isinstance(v, torch.SymInt) and sym in v.node.expr.free_symbols


def _batch_mode(val: torch.Tensor, dims, hidden_val: torch.Tensor, token_dim: int) -> str:
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


class IPCVRewritePass:
    """``IPCVRewritePass(config, layout)(gm, gmap) -> PassResult`` (torch.fx pass-infra style)."""

    def __init__(self, config: IPCVConfig, layout: SegmentLayout, refresh: bool = False):
        self.config = config
        self.refresh = refresh
        # the patch grid matters only to grid-aware variants; without them a batched layout keeps
        # one graph for every token count
        self.layout = layout if config.needs_grid else layout.without_grid()

    def __call__(self, gm: fx.GraphModule, gmap: GraphMap) -> PassResult:
        cfg = self.config
        cfg.validate_depth(gmap.depth)
        report = RewriteReport()
        g = gm.graph
        lp, as_end, depth = cfg.prune_layer, cfg.as_end, gmap.depth
        td = gmap.token_dim
        hidden_val = gmap.hidden.meta["val"]
        blocks = gmap.blocks

        def call(fn, args, kwargs=None, name=None):
            n = g.call_function(fn, tuple(args), kwargs or {})
            if name:
                n.name = g._graph_namespace.create_name(name, None)
            report.inserted[getattr(fn, "__name__", str(fn))] += 1
            return n

        def getitem(n, i):
            report.inserted["getitem"] += 1
            return g.call_function(operator.getitem, (n, i))

        sched = cfg.schedule  # ((layer, retain), ...), the final stage (l_p, r) last
        first_layer = sched[0][0]
        order = {n: i for i, n in enumerate(g.nodes)}
        stage_nodes: List[tuple] = []  # per stage: (x_keep_lp, x_rem_lp, keep_idx, rem_idx, nbr_idx, nbr_w)
        gathered_by_stage: List[Dict[fx.Node, fx.Node]] = []
        pos = None  # original positions of the current rows (node)
        log_size = None
        prev_retain = 1.0

        def gather_side(blocks_using, pos_node, after, stage_i, have=()):
            """Side inputs of ``blocks_using`` gathered to ``pos_node``'s rows (except those in ``have``)."""
            out: Dict[fx.Node, fx.Node] = {}
            for blk in blocks_using:
                for s_ in blk.side_uses:
                    if s_ in out or s_ in have:
                        continue
                    dims = gmap.side_inputs[s_]
                    mode = _batch_mode(s_.meta["val"], dims, hidden_val, td)
                    where = g.inserting_after(s_) if order.get(s_, -1) > order.get(after, 10**9) else g.inserting_after(after)
                    with where:
                        out[s_] = call(ipcv_ops.ipcv_gather_tokens, (s_, pos_node), dict(dims=dims, batch=mode),
                                       f"{s_.name}_kept{stage_i}")
                    report.side_inputs[s_.name] = dims
            return out

        def reconstruct(x_keep_l, where, name):
            with where:
                return call(ipcv_ops.ipcv_reconstruct, (x_keep_l, tuple(stage_nodes)), dict(token_dim=td), name)

        # ---------------------------------------------------------------- blocks >= first prune layer
        block_in: Optional[fx.Node] = None
        prev_in: fx.Node = blocks[first_layer - 1].input  # input of the previous block, as rewritten
        stage_of_layer = {l: (si, r) for si, (l, r) in enumerate(sched)}
        for bi in range(first_layer, depth):
            blk = blocks[bi]
            old_in = blk.input
            if block_in is None:
                block_in = old_in
            key_copies: List[fx.Node] = []
            if bi in stage_of_layer:
                si, r = stage_of_layer[bi]
                metric = None
                if cfg.selection == "bipartite":
                    side_now = dict(gathered_by_stage[-1]) if gathered_by_stage else {}
                    if pos is not None:  # side inputs at the incoming rows not gathered yet
                        side_now.update(gather_side([blk], pos, pos, f"{si}pre", have=side_now))
                    metric, key_copies = self._key_metric(g, blk, old_in, block_in, side_now, report)
                size_prev = log_size if (cfg.merge != "none" and pos is not None) else None
                with g.inserting_before(blk.nodes[0]):
                    prune = call(
                        ipcv_ops.ipcv_prune,
                        (block_in, prev_in, gmap.hidden, pos, metric, size_prev),
                        dict(
                            token_dim=td,
                            segment_lengths=self.layout.lengths,
                            protected=self.layout.protected,
                            grids=self.layout.grids,
                            merge=self.layout.merge,
                            config=cfg.to_dict(),
                            stage_retain=r,
                            prev_retain=prev_retain,
                        ),
                        f"ipcv_prune{si}" if len(sched) > 1 else "ipcv_prune",
                    )
                    outs = [getitem(prune, i) for i in range(8)]
                x_keep, x_rem, keep_idx, rem_idx, nbr_idx, nbr_w, log_size, pos = outs
                stage_nodes.append((x_keep, x_rem, keep_idx, rem_idx, nbr_idx, nbr_w))
                order = {n: i for i, n in enumerate(g.nodes)}
                prev_retain = r
                # side inputs of the kept-rows blocks of this stage (not the AS ones)
                nxt = sched[si + 1][0] if si + 1 < len(sched) else depth
                using = [b for b in blocks[bi:nxt] if not (lp <= b.index < as_end)]
                gathered_by_stage.append(gather_side(using, pos, outs[-1], si))
                block_in = x_keep
            # the block's residual stream becomes the current rows
            for n in blk.nodes:
                n.replace_input_with(old_in, block_in)
            extra = []
            if lp <= bi < as_end:
                extra = self._attention_stabilised(g, blk, block_in, pos, reconstruct, report, gmap)
            else:
                gathered = gathered_by_stage[-1]
                for n in blk.nodes:
                    for s_, s_k in gathered.items():
                        if s_ in n.all_input_nodes:
                            n.replace_input_with(s_, s_k)
                if cfg.merge != "none":
                    self._proportional_attention(g, blk, log_size, report)
            self._follow_token_count(list(blk.nodes) + extra + key_copies, gmap.token_symbol, report)
            prev_in = block_in
            block_in = blk.output

        # ---------------------------------------------------------------- reintegration
        last = blocks[-1].output
        if cfg.reintegrate:
            users = list(gmap.final_users)
            if users:
                full = reconstruct(last, g.inserting_after(last), "ipcv_reintegrate")
                for u in users:
                    u.replace_input_with(last, full)
        clean_up(gm)
        # a packed layout (static segment lengths) or a patch grid fixes the token count of the graph
        n_static = self.layout.static_tokens
        static = {gmap.token_symbol: n_static} if n_static is not None else None
        if self.refresh:
            refresh_meta(gm, static)
            gm.meta.pop("ipcv_meta_stale", None)
        else:
            # node.meta["val"] still shows the captured shapes; IPCVModule.refresh_meta() updates them
            gm.meta["ipcv_meta_stale"] = static if static is not None else {}
        gm.meta["ipcv_report"] = report
        return PassResult(gm, True)

    # ------------------------------------------------------------------------------------------
    def _attention_stabilised(self, g, blk, block_in, keep_idx, reconstruct, report, gmap):
        """AS block: keys/values over all rows (kept + NGR-reconstructed), queries for kept rows."""
        first = blk.nodes[0]
        x_full = reconstruct(block_in, g.inserting_before(first), f"ipcv_as{blk.index}_full")
        # the path block input -> attention input (e.g. the pre-attention norm), copied on full rows
        path, env = [], {}
        if blk.attn_input is block_in:
            full_attn_in = x_full
        else:
            path = _path_between(block_in, blk.attn_input, blk.nodes)
            env = {block_in: x_full}
            # right after the original attention input: every input of the path is defined by then
            with g.inserting_before(blk.attn_input.next):
                for n in path:
                    c = g.node_copy(n, lambda a: env.get(a, a))
                    c.meta = dict(n.meta)
                    env[n] = c
                    report.pre_attention_copies += 1
            full_attn_in = env[blk.attn_input]
        copies = [env[n] for n in path] if blk.attn_input is not block_in else []
        for n in blk.attn_nodes:
            n.replace_input_with(blk.attn_input, full_attn_in)
        for core in blk.attn_cores:
            q = core.args[0]
            with g.inserting_before(core):
                qk = g.call_function(
                    ipcv_ops.ipcv_gather_tokens, (q, keep_idx), dict(dims=(q.meta["val"].dim() - 2,), batch="full")
                )
                report.inserted["ipcv_gather_tokens"] += 1
                report.query_gathers += 1
                args = list(core.args)
                args[0] = qk
                mask = args[3] if len(args) > 3 else core.kwargs.get("attn_mask")
                if isinstance(mask, fx.Node):
                    mv = mask.meta["val"]
                    if -2 % mv.dim() in token_symbol_dims(mv, gmap.token_symbol):
                        mode = _batch_mode(mv, (mv.dim() - 2,), gmap.hidden.meta["val"], gmap.token_dim)
                        mk = g.call_function(
                            ipcv_ops.ipcv_gather_tokens, (mask, keep_idx), dict(dims=(mv.dim() - 2,), batch=mode)
                        )
                        report.inserted["ipcv_gather_tokens"] += 1
                        if len(args) > 3:
                            args[3] = mk
                        else:
                            kw = dict(core.kwargs)
                            kw["attn_mask"] = mk
                            core.kwargs = kw
                core.args = tuple(args)
        return copies

    def _key_metric(self, g, blk, old_in, block_in, side_map, report):
        """Bipartite selection: the block's attention keys on the rows entering it (before this
        stage prunes them), head-averaged — a copy of every node of the block the SDPA key depends
        on, reading ``block_in`` and ``side_map`` (side inputs at those rows), inserted before the
        block.  Returns ``(metric node, copied nodes)``."""
        if len(blk.attn_cores) != 1:
            raise RewriteError(
                f"selection='bipartite' needs exactly one attention core (SDPA) in block {blk.index}, "
                f"found {len(blk.attn_cores)}"
            )
        key = blk.attn_cores[0].args[1]
        anc = _ancestors_within(key, set(blk.nodes))
        if old_in not in {a for n in anc for a in n.all_input_nodes}:
            raise RewriteError(f"block {blk.index}: the attention keys do not depend on the block input")
        env = {old_in: block_in, **side_map}
        # values the key path reads from outside the block (e.g. rotary tables computed late in the
        # graph) must exist before the copies: move them (with their own late inputs) up
        at = blk.nodes[0]
        order = {n: i for i, n in enumerate(g.nodes)}

        def hoist(n):
            if order[n] < order[at]:
                return
            if n is old_in or n is block_in or n in anc or descendants_within(old_in, {n}):
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
                report.key_copies += 1
            metric = g.call_function(ipcv_ops.ipcv_key_metric, (env[key],))
            metric.name = g._graph_namespace.create_name(f"ipcv_keys{blk.index}", None)
            report.inserted["ipcv_key_metric"] += 1
        return metric, copies

    def _proportional_attention(self, g, blk, log_size, report):
        """Merge variants: every SDPA of a non-AS block after the first stage adds log(size) of its keys."""
        for core in blk.attn_cores:
            args = list(core.args)
            mask = args[3] if len(args) > 3 else core.kwargs.get("attn_mask")
            q = args[0]
            with g.inserting_before(core):
                bias = g.call_function(
                    ipcv_ops.ipcv_attention_bias, (mask, log_size), dict(dtype=q.meta["val"].dtype)
                )
            report.inserted["ipcv_attention_bias"] += 1
            if len(args) > 3:
                args[3] = bias
                core.args = tuple(args)
            else:
                kw = dict(core.kwargs)
                kw["attn_mask"] = bias
                core.kwargs = kw

    def _follow_token_count(self, nodes, sym, report):
        for n in nodes:
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
                report.sizes_repointed.append(n.name)
                continue
            if n.target is torch.ops.aten.sym_size.int:
                continue  # reads the size of a local tensor: always right
            bad = [a for a in n.all_input_nodes if _is_tok_sym(a, sym)]
            if bad:
                raise RewriteError(
                    f"{n.name} ({n.target}) takes a size derived from the token count ({[b.name for b in bad]}); "
                    "the rewrite cannot make it follow the kept-token count"
                )


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
