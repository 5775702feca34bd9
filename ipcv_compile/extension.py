"""The compiler's extension point: whole-module rewriters supplied by other packages.

``ipcv_compile.rewrite(model.visual, retain=0.35)`` is given no :class:`~ipcv_compile.LocateSpec`:
some package that knows the module (``ipcv_adapters`` for the HF towers) must say where its blocks
are, how to call them and what its output is.  The compiler knows no such package.  Packages declare
rewriters in the entry-point group :data:`ENTRY_POINT_GROUP` of their ``pyproject.toml``::

    [project.entry-points."ipcv.rewriters"]
    towers = "ipcv_adapters.registry:rewrite_with_adapter"

and the group is loaded once, on first use (:func:`rewriters`).  :func:`register_rewriter` adds one
at run time (tests, a user's own tower family).  A rewriter is a callable
``(module, config, **options) -> nn.Module`` that raises :class:`UnsupportedModuleError` for a
module it does not recognise; the first one that accepts the module wins, and when none does the
error lists what each said.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

from torch import nn

__all__ = ["ENTRY_POINT_GROUP", "UnsupportedModuleError", "Rewriter", "register_rewriter", "unregister_rewriter",
           "rewriters", "rewrite_module"]

ENTRY_POINT_GROUP = "ipcv.rewriters"

Rewriter = Callable[..., nn.Module]


class UnsupportedModuleError(TypeError):
    """No registered rewriter recognises the module (the message says what is supported)."""


_lock = threading.RLock()
_runtime: Dict[str, Rewriter] = {}  # register_rewriter(), in registration order
_entry: Optional[Dict[str, Rewriter]] = None  # the entry-point group, loaded once


def register_rewriter(name: str, fn: Rewriter) -> Rewriter:
    """Add (or replace) the rewriter ``name``; run-time registrations are asked before entry points,
    the most recent first."""
    if not callable(fn):
        raise TypeError(f"register_rewriter: {name!r} is not callable")
    with _lock:
        _runtime.pop(name, None)
        _runtime[name] = fn
    return fn


def unregister_rewriter(name: str) -> None:
    """Remove a rewriter added with :func:`register_rewriter` (entry points stay)."""
    with _lock:
        _runtime.pop(name, None)


def _entry_points() -> Dict[str, Rewriter]:
    global _entry
    with _lock:
        if _entry is None:
            from importlib.metadata import entry_points

            _entry = {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}
        return _entry


def rewriters() -> Dict[str, Rewriter]:
    """Every registered rewriter, in the order they are asked (entry points loaded on first use)."""
    entry = _entry_points()
    with _lock:
        runtime = dict(reversed(list(_runtime.items())))
    return {**runtime, **{k: v for k, v in entry.items() if k not in runtime}}


def rewrite_module(module: nn.Module, config: Any, **options: Any) -> nn.Module:
    """The first registered rewriter's result for ``module``."""
    found = rewriters()
    if not found:
        raise UnsupportedModuleError(
            f"ipcv_compile.rewrite({type(module).__name__}) without a LocateSpec needs a rewriter for the module, "
            f"and none is registered (entry-point group {ENTRY_POINT_GROUP!r}: install a package that provides one, or pass "
            "spec= and example_inputs=)")
    declined: List[UnsupportedModuleError] = []
    for fn in found.values():
        try:
            return fn(module, config, **options)
        except UnsupportedModuleError as e:
            declined.append(e)
    if len(declined) == 1:
        raise declined[0]
    raise UnsupportedModuleError("\n".join(f"[{name}] {e}" for name, e in zip(found, declined)))
