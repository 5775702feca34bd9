"""Fused q / k / v projections: which columns are the query's, and projecting only those for the
kept rows.

:func:`analyse_fused_projection` (pure analysis, no mutation) finds the one ``linear`` of an
attention that reads the attention input and from which the query's value is reached by data
movement only (reshapes, permutes, unbind, ...), and the query's columns ``[start, stop)`` of its
output — by running that data movement on a probe whose entries are their column index.  When the
projection cannot be split it raises :class:`UnsplittableProjection` saying why.
:func:`split_fused_projection` then rewrites ``linear(all, W)`` as ``linear(kept, W_q)`` (placed at
the kept rows, zeros at the removed ones) concatenated with ``linear(all, W_kv)``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import fx

from ..locate import path_between
from .context import RewriteContext
from .nodes import is_token_size

__all__ = ["FusedProjection", "UnsplittableProjection", "analyse_fused_projection", "query_columns",
           "split_fused_projection", "DATA_MOVEMENT"]

#: ops that only move data (the probe runs them on column indices)
DATA_MOVEMENT = frozenset({
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.unbind.int,
    torch.ops.aten.select.int, torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim,
    torch.ops.aten.slice.Tensor, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default,
    operator.getitem,
})
_PROBE_ROWS = (7, 11, 13)  # row counts of the probe (one that no other dim of the path equals)


class UnsplittableProjection(Exception):
    """The query's projection cannot be split off a fused one; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FusedProjection:
    linear: fx.Node  # the fused projection
    start: int  # the query's columns of its output: [start, stop)
    stop: int
    width: int  # its output features


def _width(lin: fx.Node) -> int:
    w = lin.args[1]
    val = w.meta.get("val")
    if val is None and w.op == "get_attr":
        val = lin.graph.owning_module.get_parameter(w.target)
    return int(val.shape[0])


def _probe(path: Sequence[fx.Node], width: int, rows: int, token_symbol, token_dim: int):
    """The value of ``path[-1]`` when ``path[0]`` (a linear) outputs column indices for ``rows`` rows."""
    probe = torch.arange(width, dtype=torch.float32).expand(rows, width).clone()
    env = {path[0]: probe.unsqueeze(0) if token_dim == 1 else probe}

    def arg(a):
        if not isinstance(a, fx.Node):
            return a
        if a in env:
            return env[a]
        if is_token_size(a, token_symbol):
            return rows
        raise UnsplittableProjection(f"the query's path reads {a.name}, neither the projection nor the token count")

    for n in path[1:]:
        args, kwargs = fx.node.map_aggregate(n.args, arg), fx.node.map_aggregate(n.kwargs, arg)
        try:
            env[n] = n.target(*args, **kwargs)
        except (RuntimeError, IndexError, ValueError) as e:
            raise UnsplittableProjection(f"{n.name} ({n.target}) does not run on a probe of {rows} rows: "
                                         f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    return env[path[-1]]


def query_columns(path: Sequence[fx.Node], width: int, token_symbol, token_dim: int) -> Tuple[int, int]:
    """The columns ``[start, stop)`` of ``path[0]``'s output (a linear of ``width`` features) that
    ``path[-1]`` holds, ``path[1:]`` moving data only."""
    for rows in _PROBE_ROWS:
        out = _probe(path, width, rows, token_symbol, token_dim)
        if not isinstance(out, torch.Tensor):
            raise UnsplittableProjection(f"{path[-1].name} is not a tensor")
        if list(out.shape).count(rows) != 1:
            continue  # another dim has the probe's row count: try another
        cols = sorted({int(c) for c in out.unique().tolist()})
        if cols != list(range(cols[0], cols[-1] + 1)):
            raise UnsplittableProjection(f"the query takes columns {cols[:4]}... of {path[0].name}, not one block")
        return cols[0], cols[-1] + 1
    raise UnsplittableProjection(f"no probe row count {_PROBE_ROWS} is unambiguous in {path[-1].name}'s shape")


def analyse_fused_projection(attn_nodes: Sequence[fx.Node], start: fx.Node, attn_in: fx.Node, token_symbol,
                             token_dim: int) -> FusedProjection:
    """The fused projection ``start`` (the query's value, read from a value shared with keys /
    values) comes from, and the query's columns of it."""
    lins = [n for n in attn_nodes if n.target is torch.ops.aten.linear.default and n.args[0] is attn_in]
    if len(lins) != 1:
        raise UnsplittableProjection(f"{len(lins)} linear projections read the attention input {attn_in.name} "
                                     "(a fused one is one)")
    lin = lins[0]
    path: List[fx.Node] = [lin] + path_between(lin, start, attn_nodes)
    if path[-1] is not start:
        raise UnsplittableProjection(f"{start.name} is not computed from {lin.name}")
    other = sorted({str(n.target) for n in path[1:] if n.target not in DATA_MOVEMENT})
    if other:
        raise UnsplittableProjection(f"the path {lin.name} -> {start.name} computes ({', '.join(other)}), "
                                     "not data movement only")
    width = _width(lin)
    c0, c1 = query_columns(path, width, token_symbol, token_dim)
    return FusedProjection(lin, c0, c1, width)


def split_fused_projection(ctx: RewriteContext, proj: FusedProjection, attn_in: fx.Node, kept_attn_in: fx.Node,
                           rows: fx.Node, stage: int) -> None:
    """Project q for the kept rows only: ``proj.linear`` becomes ``linear(kept, W_q)`` (kept rows,
    zeros at the removed ones, per segment) concatenated with ``linear(all, W_kv)``."""
    g, lin, c0, c1 = ctx.g, proj.linear, proj.start, proj.stop
    w, b = lin.args[1], (lin.args[2] if len(lin.args) > 2 else None)
    aten = torch.ops.aten

    def piece(t, lo, hi, dim=0):
        return g.call_function(aten.slice.Tensor, (t, dim, lo, hi))

    def rest_of(t):
        parts = [piece(t, lo, hi) for lo, hi in ((0, c0), (c1, proj.width)) if hi > lo]
        return parts[0] if len(parts) == 1 else g.call_function(aten.cat.default, (parts, 0))

    with g.inserting_before(lin):
        w_rest = rest_of(w)
        b_rest = rest_of(b) if b is not None else None
        q_lin = g.call_function(aten.linear.default, (kept_attn_in, piece(w, c0, c1),
                                                      piece(b, c0, c1) if b is not None else None))
        rest = g.call_function(aten.linear.default, (attn_in, w_rest, b_rest))
        td = ctx.gmap.token_dim
        n_kept = g.call_function(aten.sym_size.int, (rows, td))
        zeros = g.call_function(aten.zeros_like.default, (piece(piece(rest, n_kept, None, td), 0, c1 - c0, -1),))
        q_pad = ctx.concat_rows(q_lin, zeros, td, stage, f"{lin.name}_q")
        parts = [q_pad, rest] if c0 == 0 else [piece(rest, 0, c0, -1), q_pad, piece(rest, c0, None, -1)]
        fused = g.call_function(aten.cat.default, (parts, -1))
    lin.replace_all_uses_with(fused)
    ctx.report.inserted["q_projection_split"] += 1
