"""Rewritten block stacks that read the tower's **live** parameters, and notice when the tower changed.

A captured block stack (``ipcv_compile.capture``) holds, as attributes, the very parameter objects the
tower's blocks had at capture time.  Left like that, a later ``block.mlp.fc1.weight =
nn.Parameter(...)`` would be invisible to the graph, a replaced submodule (a LoRA / quantised
``Linear``) silently ignored, and an exported whole tower would carry every block weight twice (once
under the tower's name, once under the graph's).  So:

* :class:`Binding` records, right after a capture, which tower module attribute every tensor of the
  graph is (its owner's path under the blocks, the attribute name, dtype, device, shape) and every
  module of the blocks' subtree (identity and type);
* :class:`FunctionalGraph` is a rewritten graph whose bound ``get_attr`` nodes became leading
  inputs: each call passes the tensors the tower holds *now* (:meth:`Binding.resolve`), so replaced
  or reassigned parameters just work, and an export of the whole tower sees each weight once, under
  the tower's own name;
* :meth:`Binding.resolve` reports what a graph cannot follow — a submodule replaced, added or
  removed, a tensor of another dtype / device / shape (``.to(torch.bfloat16)`` after the rewrite) —
  so the tower can capture again (``IPCVTower`` does, with a warning naming it).

Serialisation (:func:`capture_to_bytes` / :func:`capture_from_bytes`): a capture travels as a
``torch.export`` archive *without* its weights (they are the tower's, pickled with it) and is bound to
the unpickled tower's tensors on load, so a pickled ``IPCVTower`` reloads without capturing again.
"""

from __future__ import annotations

import io
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

__all__ = ["Slot", "Binding", "FunctionalGraph", "capture_to_bytes", "capture_from_bytes"]


@dataclass(frozen=True)
class Slot:
    """One tensor the captured graph reads: ``blocks.<owner>.<attr>`` of the tower."""

    target: str  # get_attr target in the captured graph
    owner: str  # module path relative to the blocks module ("2.mlp.fc1")
    attr: str
    is_param: bool
    dtype: torch.dtype
    device: torch.device
    shape: Tuple[int, ...]


def _attr(root: nn.Module, target: str):
    return operator.attrgetter(target)(root)


def _tensor_of(module: nn.Module, attr: str, is_param: bool):
    return (module._parameters if is_param else module._buffers).get(attr)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} on {t.device}, shape {tuple(t.shape)}"


class Binding:
    """What one capture assumed about the tower (see the module docstring).

    Args:
        blocks: the tower's block container (``adapter.blocks``) at capture time.
        gm: the captured GraphModule (its attributes are still the blocks' tensors).
        prefix: the blocks' path in the tower, for messages (``"encoder.layer"``).
    """

    def __init__(self, blocks: nn.Module, gm: fx.GraphModule, prefix: str = "blocks"):
        self.prefix = prefix
        self.blocks = blocks
        self.modules: Tuple[Tuple[str, nn.Module], ...] = tuple(blocks.named_modules(remove_duplicate=False))
        self.types = tuple(type(m) for _, m in self.modules)
        by_path = dict(self.modules)
        owners: Dict[int, Tuple[str, str, bool]] = {}
        for path, m in self.modules:
            for k, v in m._parameters.items():
                if v is not None:
                    owners.setdefault(id(v), (path, k, True))
            for k, v in m._buffers.items():
                if v is not None:
                    owners.setdefault(id(v), (path, k, False))
        slots: Dict[str, Slot] = {}
        for n in gm.graph.nodes:
            if n.op != "get_attr" or n.target in slots:
                continue
            obj = _attr(gm, n.target)
            if isinstance(obj, torch.Tensor) and id(obj) in owners:
                path, k, is_param = owners[id(obj)]
                slots[n.target] = Slot(n.target, path, k, is_param, obj.dtype, obj.device, tuple(obj.shape))
        self.slots = slots
        self._by_path = by_path

    def _name(self, path: str) -> str:
        return f"{self.prefix}.{path}" if path else self.prefix

    def changed(self, live_blocks: nn.Module) -> Optional[str]:
        """Why the captured graph no longer describes the tower's blocks (None: it still does)."""
        if live_blocks is not self.blocks:
            return f"{self.prefix} was replaced ({type(self.blocks).__name__} -> {type(live_blocks).__name__})"
        live = list(live_blocks.named_modules(remove_duplicate=False))
        if len(live) == len(self.modules) and all(
                p == q and m is n for (p, m), (q, n) in zip(live, self.modules)):
            return None
        then = self._by_path
        now = dict(live)
        for p, m in live:
            old = then.get(p)
            if old is None:
                return f"{self._name(p)} ({type(m).__name__}) was added"
            if old is not m:
                what = (f"{type(old).__name__} -> {type(m).__name__}" if type(old) is not type(m)
                        else f"another {type(m).__name__}")
                return f"{self._name(p)} was replaced ({what})"
        for p, _ in self.modules:
            if p not in now:
                return f"{self._name(p)} was removed"
        return f"the modules under {self.prefix} changed"

    def resolve(self, live_blocks: nn.Module) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
        """``({target: the tensor the tower holds now}, None)``, or ``({}, reason)`` when the graph
        cannot run them (a changed module, or a tensor of another dtype / device / shape)."""
        why = self.changed(live_blocks)
        if why is not None:
            return {}, why
        out: Dict[str, torch.Tensor] = {}
        for s in self.slots.values():
            t = _tensor_of(self._by_path[s.owner], s.attr, s.is_param)
            if t is None:
                return {}, f"{self._name(s.owner)}.{s.attr} was removed"
            if t.dtype != s.dtype or t.device != s.device or tuple(t.shape) != s.shape:
                return {}, (f"{self._name(s.owner)}.{s.attr} is now {_describe(t)} (was "
                            f"{str(s.dtype).replace('torch.', '')} on {s.device}, shape {s.shape})")
            out[s.target] = t
        return out, None


class FunctionalGraph:
    """A rewritten graph with its bound tensors as leading inputs: ``fg(tensors, *inputs)``.

    ``tensors``: ``{target: tensor}`` from :meth:`Binding.resolve`.  The output has the rewritten
    graph's structure.  Holds no reference to any bound tensor.
    """

    def __init__(self, gm: fx.GraphModule, binding: Binding):
        cg = gm.graph._codegen
        self.out_spec = cg.pytree_info.out_spec if getattr(cg, "pytree_info", None) is not None else None
        graph = fx.Graph()  # a plain-codegen copy of the graph (node meta shared, not deep-copied)
        env: Dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(gm.graph, env)
        graph.output(out)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        first = placeholders[0] if placeholders else next(iter(graph.nodes))
        targets: List[str] = []
        made: Dict[str, fx.Node] = {}
        for n in list(graph.nodes):
            if n.op != "get_attr" or n.target not in binding.slots:
                continue
            ph = made.get(n.target)
            if ph is None:
                with graph.inserting_before(first):
                    ph = graph.placeholder(f"ipcv_w{len(targets)}")
                ph.meta = dict(n.meta)
                made[n.target] = ph
                targets.append(n.target)
            n.replace_all_uses_with(ph)
            graph.erase_node(n)
        # only what the graph still reads (constants, the input guards) is copied from ``gm``
        self.gm = fx.GraphModule(gm, graph, class_name="IPCVFunctionalStack")
        self.targets = tuple(targets)

    def __call__(self, tensors: Dict[str, torch.Tensor], *inputs):
        return self.unflatten(self.gm(*[tensors[t] for t in self.targets], *inputs))

    def unflatten(self, out):
        """``gm``'s flat output -> the rewritten graph's output structure."""
        if self.out_spec is None:
            return out
        return pytree.tree_unflatten(list(out), self.out_spec)


# --------------------------------------------------------------------------------------------- pickling
def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A weightless stand-in of ``t`` (one stored element, expanded to its shape)."""
    z = torch.zeros((), dtype=t.dtype, device="cpu").expand(t.shape)
    return nn.Parameter(z, requires_grad=False) if isinstance(t, nn.Parameter) else z


def capture_to_bytes(gm: fx.GraphModule, binding: Binding, example_inputs: Sequence[Any], dynamic_shapes) -> Dict[str, Any]:
    """A captured block stack as a ``torch.export`` archive (bytes) without the tower's weights, plus
    where each stripped weight belongs: ``{"pt2": bytes, "slots": {fqn: (owner, attr, is_param)},
    "meta": {...}}``.  The captured graph is exported again (its node metadata — the
    ``nn_module_stack`` the locator reads — is preserved)."""
    by_id = {}
    for s in binding.slots.values():
        by_id[id(_attr(gm, s.target))] = s
    with torch.no_grad():
        ep = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes, strict=False)
    slots = {}
    for fqn, t in list(ep.state_dict.items()):
        s = by_id.get(id(t))
        if s is not None:
            slots[fqn] = (s.owner, s.attr, s.is_param)
            ep.state_dict[fqn] = _stand_in(t)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the weightless stand-ins are expanded scalars, by design
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(ep, buf)
    meta = {k: v for k, v in gm.meta.items() if k.startswith("ipcv_") and k != "ipcv_meta_stale"}
    return {"pt2": buf.getvalue(), "slots": slots, "meta": meta}


def capture_from_bytes(state: Dict[str, Any], blocks: nn.Module) -> fx.GraphModule:
    """The captured GraphModule of :func:`capture_to_bytes`, its stripped weights replaced by the
    tensors of ``blocks`` (the unpickled tower's)."""
    with warnings.catch_warnings():  # the weightless stand-ins are expanded scalars, by design
        warnings.filterwarnings("ignore", message="No complete tensor found")
        ep = torch.export.load(io.BytesIO(state["pt2"]))
    gm = ep.module()
    mods = dict(blocks.named_modules(remove_duplicate=False))
    for fqn, (owner, attr, is_param) in state["slots"].items():
        t = _tensor_of(mods[owner], attr, is_param)
        sub, _, name = fqn.rpartition(".")
        m = gm.get_submodule(sub) if sub else gm
        if name in m._parameters:
            m._parameters[name] = t
        elif name in m._buffers:
            m._buffers[name] = t
        else:
            setattr(m, name, t)
    gm.meta.update(state.get("meta", {}))
    return gm
