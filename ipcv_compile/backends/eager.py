"""``eager``: the rewritten GraphModule as it is (Python + ATen kernels)."""

from __future__ import annotations

from .common import Lowered, graph_of


def lower_eager(module, example_inputs, *, example_kwargs=None, path=None, dynamic=True, dynamic_shapes=None, **opts):
    if opts:
        raise TypeError(f"eager backend takes no options, got {sorted(opts)}")
    return Lowered("eager", graph_of(module))
