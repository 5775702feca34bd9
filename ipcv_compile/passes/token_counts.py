"""Follow token counts: export reads the token count once (``sym_size`` of an input) and feeds it
to every reshape; after a prune stage that count is wrong for kept rows.  Each reshape in a
rewritten block (its own nodes and those the rewrite copied into it) whose shape has exactly one
element derived from the token count gets ``-1`` there instead, so it follows whatever row count
reaches it; any other op still reading the token count is an error (``ensures``)."""

from __future__ import annotations

import torch
from torch import fx

from .context import RewriteContext, RewriteError, RewriteStep
from .nodes import Rewritten, is_token_size

__all__ = ["FollowTokenCountsPass", "RESHAPES", "check_no_token_size"]

RESHAPES = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                      torch.ops.aten._unsafe_view.default})


def check_no_token_size(n: fx.Node, sym) -> None:
    if n.op != "call_function" or n.target is torch.ops.aten.sym_size.int:
        return  # sym_size reads the size of a local tensor: always right
    bad = [a for a in n.all_input_nodes if is_token_size(a, sym)]
    if bad:
        raise RewriteError(
            f"{n.name} ({n.target}) takes a size derived from the token count ({[b.name for b in bad]}); "
            "the rewrite cannot make it follow the kept-token count"
        )


def _follow(n: fx.Node, sym) -> bool:
    """A reshape reading the token count reads ``-1`` instead; True when changed."""
    shape = list(n.args[1])
    hits = [i for i, a in enumerate(shape) if is_token_size(a, sym)]
    if not hits:
        return False
    val = n.meta.get("val")
    # an inferred size (-1) already present is pinned to its static value first
    # (transformers reshapes as view(*x.shape[:-1], -1, head_dim))
    for i, a in enumerate(shape):
        if isinstance(a, int) and a == -1:
            if isinstance(val, torch.Tensor) and len(val.shape) == len(shape) and isinstance(val.shape[i], int):
                shape[i] = int(val.shape[i])
            else:
                raise RewriteError(f"{n.name} ({n.target}) infers a non-static size (-1) besides the token count in "
                                   f"{list(n.args[1])}; cannot make it follow the kept-token count")
    if len(hits) > 1:
        raise RewriteError(f"{n.name} ({n.target}) has {len(hits)} sizes derived from the token count in "
                           f"{list(n.args[1])}; cannot make it follow the kept-token count")
    shape[hits[0]] = -1
    n.args = (n.args[0], shape) + tuple(n.args[2:])
    return True


class FollowTokenCountsPass(RewriteStep):
    """Reshapes in the blocks from the first stage on follow the row count that reaches them."""

    def run(self, ctx: RewriteContext) -> bool:
        sym, done = ctx.gmap.token_symbol, Rewritten.read(ctx.g)
        for plan in ctx.pruned():
            for n in ctx.block_nodes(done, ctx.block(plan)):
                if n.op != "call_function":
                    continue
                if n.target not in RESHAPES:
                    check_no_token_size(n, sym)
                elif _follow(n, sym):
                    ctx.report.sizes_repointed.append(n.name)
        return bool(ctx.report.sizes_repointed)

    def ensures(self, gm: fx.GraphModule) -> None:
        ctx = RewriteContext.of(gm)
        sym, done = ctx.gmap.token_symbol, Rewritten.read(ctx.g)
        live = set(ctx.g.nodes)
        for plan in ctx.pruned():
            for n in ctx.block_nodes(done, ctx.block(plan)):
                if n not in live:
                    continue
                if not (n.op == "call_function" and n.target in RESHAPES):
                    check_no_token_size(n, sym)
                elif any(is_token_size(a, sym) for a in n.args[1]):
                    raise RewriteError(f"{n.name} still reshapes to the captured token count")
