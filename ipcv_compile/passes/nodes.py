"""Graph-side helpers of the IPCV rewrite passes: tagging nodes in ``node.meta["ipcv"]``, SDPA
masks, token-count sizes, and :class:`Rewritten` — what earlier passes inserted, read back from
the tags (see :mod:`.context` for the tags)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx

from ipcv_core.prune import PruneOutputs

__all__ = ["Rewritten", "tag", "mask_of", "set_mask", "is_token_size", "batch_mode", "node_order"]


# --------------------------------------------------------------------------------------------- node helpers
def tag(node: fx.Node, **info) -> fx.Node:
    """Add ``info`` to ``node.meta["ipcv"]`` (a new dict: copied nodes share their original's)."""
    node.meta["ipcv"] = {**(node.meta.get("ipcv") or {}), **info}
    return node


def _info(node: fx.Node) -> dict:
    return node.meta.get("ipcv") or {}


def mask_of(core: fx.Node):
    return core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")


def set_mask(core: fx.Node, mask: fx.Node) -> None:
    """Give an attention core the ``attn_mask`` ``mask`` (positional or keyword, wherever it was)."""
    if len(core.args) > 3:
        core.args = core.args[:3] + (mask,) + core.args[4:]
    else:
        core.kwargs = {**core.kwargs, "attn_mask": mask}


def is_token_size(a, sym) -> bool:
    """``a`` is a size node derived from the token-count symbol ``sym``."""
    if not isinstance(a, fx.Node):
        return False
    v = a.meta.get("val")
    return isinstance(v, torch.SymInt) and sym in v.node.expr.free_symbols


def batch_mode(val: torch.Tensor, dims, hidden_val: torch.Tensor, token_dim: int) -> str:
    """How a per-token value's dim 0 relates to the batch: ``full`` / ``broadcast`` / ``none``."""
    if token_dim == 0 or val.dim() < 2 or 0 in dims:
        return "none"
    b, hb = val.shape[0], hidden_val.shape[0]
    if isinstance(b, int) and b == 1 and not (isinstance(hb, int) and hb == 1):
        return "broadcast"
    if (isinstance(b, torch.SymInt) and isinstance(hb, torch.SymInt) and b.node.expr == hb.node.expr) or (
        isinstance(b, int) and isinstance(hb, int) and b == hb
    ):
        return "full"
    return "none"


def node_order(g: fx.Graph) -> Dict[fx.Node, int]:
    return {n: i for i, n in enumerate(g.nodes)}


# --------------------------------------------------------------------------------------------- what was inserted
@dataclass(frozen=True)
class Rewritten:
    """What the passes so far inserted, read from ``node.meta["ipcv"]`` in one walk of the graph
    (:meth:`read`): per stage its :class:`~ipcv_core.prune.PruneOutputs` nodes, the side inputs
    gathered to its rows, the AS rows' positions; per block the nodes copied into it and its
    attention cores as they are now."""

    stages: Tuple[Dict[str, fx.Node], ...]  # per stage: PruneOutputs field -> node ("prune": the op node)
    gathered: Dict[Tuple[int, str], Dict[fx.Node, fx.Node]]  # (stage, rows) -> side input -> gathered
    as_positions: Dict[int, fx.Node]
    copies: Dict[Tuple[int, str], List[fx.Node]]  # (block, copy kind) -> copies, in graph order
    cores: Dict[int, List[fx.Node]]  # block -> its attention cores, in graph order

    @classmethod
    def read(cls, g: fx.Graph) -> "Rewritten":
        prunes: Dict[int, fx.Node] = {}
        gathered: Dict[Tuple[int, str], Dict[fx.Node, fx.Node]] = {}
        as_positions, copies, cores = {}, {}, {}
        for n in g.nodes:
            info = _info(n)
            role = info.get("role")
            if role == "prune":
                prunes[info["stage"]] = n
            elif role == "side_input":
                gathered.setdefault((info["stage"], info["rows"]), {})[n.args[0]] = n
            elif role == "as_positions":
                as_positions[info["stage"]] = n
            elif "copy" in info:
                copies.setdefault((info["block"], info["copy"]), []).append(n)
            elif role == "attention_core":
                cores.setdefault(info["block"], []).append(n)
        stages = []
        for i in sorted(prunes):
            outs = {PruneOutputs._fields[u.args[1]]: u for u in prunes[i].users if u.target is operator.getitem}
            stages.append({**outs, "prune": prunes[i]})
        return cls(tuple(stages), gathered, as_positions, copies, cores)

    def side(self, stage: Optional[int], rows: str = "kept") -> Dict[fx.Node, fx.Node]:
        return {} if stage is None else self.gathered.get((stage, rows), {})

    def copies_of(self, b: int, *kinds: str) -> List[fx.Node]:
        return [n for k in (kinds or ("key", "attention_input")) for n in self.copies.get((b, k), [])]
