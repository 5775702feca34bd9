"""Analysis: find blocks, attention, FFN, residual stream and per-token side inputs in a captured
graph.  Pure analysis, no mutation (except recording results in ``node.meta["ipcv"]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from .spec import LocateSpec

__all__ = ["LocateError", "BlockInfo", "GraphMap", "locate", "token_symbol_dims", "descendants_within",
           "ancestors_within", "path_between"]

SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default,)


class LocateError(RuntimeError):
    """The graph's structure was not recognised; the message lists what was and was not found."""


@dataclass
class BlockInfo:
    index: int
    path: str
    nodes: List[fx.Node]
    input: fx.Node  # residual stream entering the block
    output: fx.Node  # residual stream leaving the block
    attn_nodes: List[fx.Node]
    attn_input: fx.Node  # value (computed in the block, e.g. norm1 output) the attention consumes
    attn_output: fx.Node
    attn_cores: List[fx.Node]  # SDPA nodes
    ffn_nodes: List[fx.Node]
    ffn_input: fx.Node
    ffn_output: fx.Node
    residual_adds: List[fx.Node]
    side_uses: List[fx.Node] = field(default_factory=list)  # outside values (side inputs) used


@dataclass
class GraphMap:
    blocks: List[BlockInfo]
    hidden: fx.Node  # value entering block 0
    token_dim: int
    token_symbol: object  # sympy symbol of the token count (None if static)
    side_inputs: Dict[fx.Node, Tuple[int, ...]]  # outside values used by blocks -> their token dims
    final_users: List[fx.Node]  # users of the last block's output outside the blocks
    taps: Dict[int, List[fx.Node]] = field(default_factory=dict)  # block -> users of its output outside the blocks
    spec: Optional[LocateSpec] = None

    @property
    def depth(self) -> int:
        return len(self.blocks)


def _paths(node: fx.Node) -> List[str]:
    st = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in st.values()]


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def token_symbol_dims(val, sym) -> Tuple[int, ...]:
    """Dims of a fake tensor whose size is exactly the token-count symbol."""
    if sym is None or not isinstance(val, torch.Tensor):
        return ()
    dims = []
    for i, s in enumerate(val.shape):
        if isinstance(s, torch.SymInt) and s.node.expr == sym:
            dims.append(i)
    return tuple(dims)


def _tensor_inputs(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]


def _boundary(nodes: Sequence[fx.Node]) -> Tuple[List[fx.Node], List[fx.Node]]:
    """(outside tensor values consumed by ``nodes``, ``nodes`` consumed outside), in graph order."""
    s = set(nodes)
    ins, outs = [], []
    for n in nodes:
        for a in _tensor_inputs(n):
            if a not in s and a.op != "get_attr" and a not in ins:
                ins.append(a)
        if any(u not in s for u in n.users) and n not in outs:
            outs.append(n)
    return ins, outs


def descendants_within(src: fx.Node, within: set) -> set:
    """Nodes of ``within`` reachable from ``src`` through users (``src`` excluded)."""
    seen, stack = set(), [src]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in within and u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def ancestors_within(dst: fx.Node, within: set) -> set:
    """Nodes of ``within`` that ``dst`` depends on through nodes of ``within`` (``dst`` included)."""
    anc, stack = set(), [dst]
    while stack:
        n = stack.pop()
        if n in anc or n not in within:
            continue
        anc.add(n)
        stack.extend(n.all_input_nodes)
    return anc


def path_between(src: fx.Node, dst: fx.Node, nodes) -> List[fx.Node]:
    """Nodes of ``nodes`` (in graph order) on some path from ``src`` to ``dst`` (``dst`` included)."""
    node_set = set(nodes)
    anc = ancestors_within(dst, node_set)
    desc = descendants_within(src, node_set)
    return [n for n in nodes if n in anc and n in desc]


def locate(gm: fx.GraphModule, spec: LocateSpec) -> GraphMap:
    graph = gm.graph
    pat = re.compile(r"^" + re.escape(spec.blocks) + r"\.(\d+)$")
    by_block: Dict[int, List[fx.Node]] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        for p in _paths(n):
            m = pat.match(p)
            if m:
                by_block.setdefault(int(m.group(1)), []).append(n)
                break
    found: List[str] = []
    missing: List[str] = []
    if not by_block:
        seen = sorted({p for n in graph.nodes for p in _paths(n)})[:12]
        raise LocateError(
            f"no block nodes found for LocateSpec.blocks={spec.blocks!r} (looked for module paths "
            f"'{spec.blocks}.<i>' in node.meta['nn_module_stack']); module paths present include: {seen}"
        )
    idx = sorted(by_block)
    if idx != list(range(len(idx))):
        raise LocateError(f"block indices under {spec.blocks!r} are not contiguous from 0: {idx}")
    found.append(f"{len(idx)} blocks under {spec.blocks!r}")

    # hidden input and token symbol
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    blocks: List[BlockInfo] = []
    prev_out: Optional[fx.Node] = None
    side: Dict[fx.Node, Tuple[int, ...]] = {}
    hidden: Optional[fx.Node] = None
    sym = None
    for i in idx:
        all_nodes = by_block[i]
        path = spec.block_path(i)
        if i == 0:
            ins0, _ = _boundary(all_nodes)
            if spec.hidden_input is not None:
                if spec.hidden_input not in placeholders:
                    raise LocateError(
                        f"LocateSpec.hidden_input={spec.hidden_input!r} is not a graph input; inputs: {list(placeholders)}"
                    )
                hidden = placeholders[spec.hidden_input]
            else:
                cands = [a for a in ins0 if a.op == "placeholder" and a.meta["val"].dim() >= 2]
                if len(cands) != 1:
                    cands = [a for a in ins0 if a.op == "placeholder" and a.meta["val"].dim() == len(cands[0].meta["val"].shape)] if cands else []
                if len(cands) != 1:
                    raise LocateError(
                        f"{path}: cannot tell which input is the residual stream (candidates: "
                        f"{[c.name for c in cands]}); set LocateSpec.hidden_input"
                    )
                hidden = cands[0]
            blk_in = hidden
            tok = _val(hidden).shape[spec.token_dim]
            sym = tok.node.expr if isinstance(tok, torch.SymInt) else None
            if sym is None:
                raise LocateError(
                    f"the token dimension {spec.token_dim} of {hidden.name} is static ({tok}); capture with a "
                    "dynamic token dimension (ipcv_compile.capture does) so sizes can follow the kept count"
                )
        else:
            blk_in = prev_out
        # the block proper: nodes that depend on the residual stream.  Nodes that depend only on side
        # inputs (e.g. a rotary table cast, hoisted by export and shared by all blocks) are side values.
        dep = descendants_within(blk_in, set(all_nodes))
        nodes = [n for n in all_nodes if n in dep]
        if not nodes:
            raise LocateError(f"{path} does not consume the output of block {i - 1} ({blk_in.name})")
        ins, outs = _boundary(nodes)
        tensor_outs = [o for o in outs if isinstance(_val(o), torch.Tensor)]
        if len(tensor_outs) != 1:
            raise LocateError(
                f"{path}: expected exactly one tensor leaving the block (the residual stream), found "
                f"{[o.name for o in tensor_outs]}. Found so far: {found}"
            )
        out = tensor_outs[0]
        for a in ins:
            if a is blk_in:
                continue
            dims = token_symbol_dims(_val(a), sym)
            if a.name in spec.side_inputs:
                dims = tuple(spec.side_inputs[a.name])
            if dims:
                side[a] = dims
        # attention / ffn
        apath, fpath = f"{path}.{spec.attention}", f"{path}.{spec.ffn}"
        attn = [n for n in nodes if any(p == apath or p.startswith(apath + ".") for p in _paths(n))]
        ffn = [n for n in nodes if any(p == fpath or p.startswith(fpath + ".") for p in _paths(n))]
        if not attn:
            missing.append(f"attention module {apath!r}")
        if not ffn:
            missing.append(f"FFN module {fpath!r}")
        if missing:
            raise LocateError(f"{path}: not found: {missing}. Found: {found}")
        a_ins, a_outs = _boundary(attn)
        a_ins = [a for a in a_ins if a not in side and a in set(nodes)]
        a_outs = [o for o in a_outs if isinstance(_val(o), torch.Tensor)]
        cores = [n for n in attn if n.target in SDPA_TARGETS]
        f_ins, f_outs = _boundary(ffn)
        f_ins = [a for a in f_ins if a not in side and a in set(nodes)]
        f_outs = [o for o in f_outs if isinstance(_val(o), torch.Tensor)]
        problems = []
        if len(a_ins) != 1:
            problems.append(f"attention input (expected 1 value from inside the block, got {[a.name for a in a_ins]})")
        if len(a_outs) != 1:
            problems.append(f"attention output (expected 1, got {[a.name for a in a_outs]})")
        if not cores:
            ops = sorted({str(n.target) for n in attn if n.op == "call_function"})
            problems.append(
                "attention core: no aten.scaled_dot_product_attention in "
                f"{apath} (use an SDPA attention implementation); ops there: {ops[:15]}"
            )
        if len(f_ins) != 1:
            problems.append(f"FFN input (expected 1, got {[a.name for a in f_ins]})")
        if len(f_outs) != 1:
            problems.append(f"FFN output (expected 1, got {[a.name for a in f_outs]})")
        if problems:
            raise LocateError(f"{path}: could not identify: {'; '.join(problems)}. Found: {found}")
        adds = [
            n
            for n in nodes
            if n not in attn and n not in ffn and n.target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
        ]
        info = BlockInfo(
            i, path, nodes, blk_in, out, attn, a_ins[0], a_outs[0], cores, ffn, f_ins[0], f_outs[0], adds,
            [a for a in ins if a in side],
        )
        for n in nodes:
            n.meta.setdefault("ipcv", {})["block"] = i
        for n in attn:
            n.meta["ipcv"]["role"] = "attention"
        for n in ffn:
            n.meta["ipcv"]["role"] = "ffn"
        for n in cores:
            n.meta["ipcv"]["role"] = "attention_core"
        blocks.append(info)
        prev_out = out
        found.append(f"{path}: attention core {[c.name for c in cores]}, FFN {ffn[0].name}..{ffn[-1].name}")
    block_nodes = {n for b in blocks for n in b.nodes}
    final_users = [u for u in blocks[-1].output.users if u not in block_nodes]
    # taps: intermediate block outputs that leave the block stack (deepstack features, feature layers)
    taps = {b.index: [u for u in b.output.users if u not in block_nodes] for b in blocks[:-1]}
    return GraphMap(blocks, hidden, spec.token_dim, sym, side, final_users, {i: u for i, u in taps.items() if u}, spec)
