"""Adapter registry, ``rewrite_with_adapter`` (behind ``ipcv_compile.rewrite(tower, ...)``) and the
eager-driver path through the same adapters."""

from __future__ import annotations

import warnings
from typing import Any, List, Optional, Tuple, Type

import torch
from torch import nn

from ipcv_compile.extension import UnsupportedModuleError
from ipcv_core.config import IPCVConfig
from ipcv_core.driver import DriverOutput, run_blocks, run_ipcv

from .base import TowerAdapter
from .tower import DEFAULT_CACHE_SIZE, IPCVTower

__all__ = [
    "UnsupportedTowerError",
    "register_adapter",
    "adapters",
    "supported_towers",
    "find_adapter",
    "rewrite_with_adapter",
    "run_eager",
    "ShallowDefaultsWarning",
    "warn_if_clipped",
]

_ADAPTERS: List[Type[TowerAdapter]] = []

# attribute paths under which VLMs keep their vision tower (for a helpful error message only)
_TOWER_PATHS = ("visual", "model.visual", "vision_tower", "model.vision_tower", "vision_model",
                "model.vision_model")


class UnsupportedTowerError(UnsupportedModuleError):
    """No registered adapter recognises the module."""


def register_adapter(cls: Type[TowerAdapter]) -> Type[TowerAdapter]:
    """Class decorator: make ``cls`` available to :func:`find_adapter` (later registrations win)."""
    if not (isinstance(cls, type) and issubclass(cls, TowerAdapter)):
        raise TypeError(f"register_adapter expects a TowerAdapter subclass, got {cls!r}")
    if not cls.tower_classes:
        raise ValueError(f"{cls.__name__}.tower_classes is empty")
    if cls in _ADAPTERS:
        _ADAPTERS.remove(cls)
    _ADAPTERS.insert(0, cls)
    return cls


def adapters() -> Tuple[Type[TowerAdapter], ...]:
    return tuple(_ADAPTERS)


def supported_towers() -> List[str]:
    """Dotted class names of every supported tower."""
    return [c for a in reversed(_ADAPTERS) for c in a.tower_classes]


def _get_path(obj: Any, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_adapter(module: nn.Module) -> TowerAdapter:
    """An adapter instance for ``module``, or :class:`UnsupportedTowerError` saying what is supported
    and how to add support."""
    for cls in _ADAPTERS:
        if cls.matches(module):
            return cls(module)
    hint = ""
    for p in _TOWER_PATHS:
        sub = _get_path(module, p)
        if isinstance(sub, nn.Module) and any(a.matches(sub) for a in _ADAPTERS):
            hint = (f"\n{type(module).__name__} holds a supported tower at .{p}: rewrite that, e.g. "
                    f"`model.{p} = ipcv_compile.rewrite(model.{p}, retain=0.35)`.")
            break
    supported = "\n".join(f"  - {c}" for c in supported_towers())
    raise UnsupportedTowerError(
        f"ipcv: no adapter for {type(module).__module__}.{type(module).__name__}.{hint}\n"
        f"Supported vision towers:\n{supported}\n"
        "To add one: subclass ipcv_adapters.TowerAdapter (see ipcv_adapters/base.py; "
        "ipcv_adapters/clip_siglip.py is a short example) and decorate it with "
        "@ipcv_adapters.register_adapter; or capture your own block stack and call "
        "ipcv_compile.rewrite(stack, spec=LocateSpec(...), example_inputs=(...)) directly."
    )


def rewrite_with_adapter(tower: nn.Module, config: Optional[IPCVConfig] = None, *,
                         cache_size: int = DEFAULT_CACHE_SIZE, feature_layers=None) -> IPCVTower:
    """The drop-in IPCV version of a supported tower (captured now; see :class:`IPCVTower`).  The
    rewriter ``ipcv_compile.rewrite(tower, ...)`` finds through the ``ipcv.rewriters`` entry point.

    ``feature_layers``: the entries of HF's ``hidden_states`` the model holding the tower reads on
    every call — its ``vision_feature_layer`` (LLaVA: ``-2``; an int or a list) — captured now with
    the rest, so that the first ``generate()`` does not capture the block stack a second time
    (:func:`ipcv_adapters.compress` passes the VLM's own)."""
    if isinstance(tower, IPCVTower):
        raise ValueError("this tower is already IPCV-rewritten; use tower.with_config(...) for another config, "
                         "or rewrite tower.tower (the original)")
    adapter = find_adapter(tower)
    if feature_layers is not None:
        adapter.set_feature_layers(feature_layers)
    config = config or IPCVConfig()
    rewritten = IPCVTower(tower, adapter, config, cache_size=cache_size)
    warn_if_clipped(type(tower).__name__, adapter, config, rewritten.ipcv_config)
    return rewritten


class ShallowDefaultsWarning(UserWarning):
    """The tower's default ``l_p`` / ``Δ``, clipped to a shallow tower, leave few blocks pruned."""


def warn_if_clipped(name: str, adapter: TowerAdapter, config: IPCVConfig, resolved: IPCVConfig) -> None:
    """Warn when the tower's default attention-stabilisation depth ``Δ`` (``as_depth`` left ``None``)
    had to be clipped to the depth so far (``Δ < 2``) that the ratio barely reduces the tower's
    work: e.g. an 8-block InternVL tower resolves l_p = 7, Δ = 1 — one block sees the kept rows."""
    if config.as_depth is not None or resolved.retain >= 1.0 or resolved.stages \
            or not resolved.placement_rule.allows_as:
        return
    default = int(adapter.default_config.get("as_depth", 0))
    if not (resolved.as_depth < 2 and resolved.as_depth < default):
        return
    depth = adapter.depth
    pruned = depth - resolved.prune_layer
    lp = max(1, depth // 3)
    delta = max(0, min(2, depth - lp - 1))
    warnings.warn(
        f"ipcv: {name} has {depth} blocks, so its default IPCV schedule (l_p={adapter.default_config.get('prune_layer')}, "
        f"Δ={default}) was clipped to l_p={resolved.prune_layer}, Δ={resolved.as_depth}: only {pruned} of {depth} "
        f"block(s) run on the kept tokens, and retain={resolved.retain} barely reduces the tower's work. Set them "
        f"explicitly, e.g. ipcv_compile.rewrite(tower, retain={resolved.retain}, prune_layer={lp}, as_depth={delta}) "
        f"(IPCVConfig.prune_layer / as_depth: l_p in [1, {depth - 1}], l_p + Δ <= {depth}).",
        ShallowDefaultsWarning, stacklevel=5)


@torch.no_grad()
def run_eager(tower: nn.Module, config: Optional[IPCVConfig], *args, **kwargs) -> Tuple[Any, Optional[DriverOutput]]:
    """The tower's forward through its adapter's eager branches and ipcv_core's driver (no export):
    ``(output of the tower's type, DriverOutput or None)``.  ``config=None`` runs the plain blocks
    through the same branches.  This is the oracle the rewritten graph is tested against."""
    adapter = tower.adapter if isinstance(tower, IPCVTower) else find_adapter(tower)
    prep = adapter.prepare(*args, **kwargs)
    h = prep.hidden
    packed = h.dim() == 2
    hb = h.unsqueeze(0) if packed else h
    blocks = adapter.branches(prep)
    taps = adapter.taps_for(prep)
    if config is None:
        tapped = {}
        out, res = run_blocks(hb, blocks, prep.layout, taps, tapped), None
    else:
        res = run_ipcv(hb, blocks, adapter.schedule(config), prep.layout, taps)
        out, tapped = res.hidden_states, res.taps
    if packed:
        out, tapped = out.squeeze(0), {i: t.squeeze(0) for i, t in tapped.items()}
    return adapter.finish(out, prep, tapped), res
