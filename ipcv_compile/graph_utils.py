"""Pass infrastructure: clean-up after a rewrite, metadata refresh, shape probes."""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable

import torch
from torch import fx

__all__ = ["clean_up", "refresh_meta", "probe_shapes", "count_ops", "quiet_torch_deprecations"]

# deprecation warnings torch raises from its *own* code on the paths ipcv calls (known noise: the
# caller cannot act on them); filtered only around those calls, never globally
_TORCH_NOISE = (
    # torch.utils._pytree: copying / exporting a graph whose output spec holds a LeafSpec (torch 2.13)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


@contextlib.contextmanager
def quiet_torch_deprecations():
    """Silence torch's known ``FutureWarning`` noise (:data:`_TORCH_NOISE`) inside the block; every
    other warning passes through."""
    with warnings.catch_warnings():
        for msg in _TORCH_NOISE:
            warnings.filterwarnings("ignore", message=msg, category=FutureWarning)
        yield


def clean_up(gm: fx.GraphModule) -> None:
    """Dead-code elimination, ``graph.lint()``, ``recompile()`` (as torch-tensorrt's
    ``clean_up_graph_after_modifications``)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def refresh_meta(gm: fx.GraphModule, static_sizes: dict | None = None, symbolic: bool = True) -> None:
    """Re-run fake-tensor propagation so every node's ``meta["val"]`` shows its new shape.

    Runs in a *fresh* ShapeEnv (one new symbol per symbol of the captured inputs), so guards that
    the rewritten graph implies — e.g. a packed layout fixing the token count — never leak into
    the captured graph's ShapeEnv, which later rewrites of the same capture reuse.
    ``static_sizes`` maps old symbols to ints to specialise (e.g. ``{N: 1234}`` for a packed layout).
    ``symbolic=False`` uses the capture's example sizes for every symbol: much faster (no symbolic
    reasoning), shapes are then those of the example inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in phs]
    if not all(isinstance(v, torch.Tensor) or v is None or isinstance(v, (int, float, bool)) for v in vals):
        return
    static_sizes = dict(static_sizes or {})
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    new_syms: dict = {}

    def size(s):
        if not isinstance(s, torch.SymInt):
            return s
        expr = s.node.expr
        if expr in static_sizes:
            return static_sizes[expr]
        if not symbolic and s.node.hint is not None:
            return int(s.node.hint)
        if expr not in new_syms:
            if not expr.is_symbol:
                return int(s.node.hint) if s.node.hint is not None else s
            new_syms[expr] = env.create_unspecified_symint_and_symbol(
                int(s.node.hint), ConstantSource(f"ipcv_{expr}"), DimDynamic.DYNAMIC
            )
        return new_syms[expr]

    inputs = []
    with mode:
        for v in vals:
            if isinstance(v, torch.Tensor):
                inputs.append(torch.empty([size(s) for s in v.shape], dtype=v.dtype, device=v.device))
            else:
                inputs.append(v)
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


def probe_shapes(gm: fx.GraphModule, nodes: Iterable[fx.Node], static_sizes: dict | None = None) -> Dict[fx.Node, object]:
    """Run ``gm`` on fake inputs of concrete sizes (each symbol of the captured inputs at
    ``static_sizes`` or its example value) and return the values of ``nodes``; ``meta`` is not
    touched.  Fast: no symbolic reasoning."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    want = set(nodes)
    static_sizes = dict(static_sizes or {})
    got: Dict[fx.Node, object] = {}

    def size(s):
        if not isinstance(s, torch.SymInt):
            return s
        return static_sizes.get(s.node.expr, int(s.node.hint))

    class _Probe(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n in want:
                got[n] = r
            return r

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        inputs = []
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            v = n.meta.get("val")
            inputs.append(torch.empty([size(d) for d in v.shape], dtype=v.dtype, device=v.device)
                          if isinstance(v, torch.Tensor) else v)
        _Probe(gm).run(*inputs)
    return got


def count_ops(gm: fx.GraphModule) -> dict:
    """``{target name: count}`` of call_function nodes."""
    out: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            out[name] = out.get(name, 0) + 1
    return out
