"""The ``ipcv`` entry of a vLLM model's config (``hf_overrides={"ipcv": {...}}``): parsed, checked and
resolved once, the same way in the engine process (at start-up, before any worker) and in each worker.
No vLLM import here."""

from __future__ import annotations

import functools
from typing import Any, Optional

from ipcv_core.config import IPCVConfig
from ipcv_core.schedule import Schedule

__all__ = ["ipcv_config_of", "guard_unsupported_architectures"]


def _defaults(arch: str):
    """The per-model defaults of the transformers adapter of the same tower family (one source)."""
    from ipcv_adapters.qwen2_vl import Qwen2VLAdapter
    from ipcv_adapters.qwen_family import Qwen2_5VLAdapter, Qwen3VLAdapter

    return {"Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
            "Qwen2_5_VLForConditionalGeneration": Qwen2_5VLAdapter,
            "Qwen3VLForConditionalGeneration": Qwen3VLAdapter}[arch].default_config


def ipcv_config_of(hf_config: Any, arch: str) -> Optional[IPCVConfig]:
    """The resolved :class:`IPCVConfig` of a model config carrying ``ipcv`` (None without it).
    Raises ValueError naming the field for a bad value, and for a variant vLLM's towers cannot run."""
    from .tower import check_config

    raw = getattr(hf_config, "ipcv", None)
    if raw is None:
        return None
    if isinstance(raw, IPCVConfig):
        cfg = raw
    elif isinstance(raw, dict):
        cfg = IPCVConfig.from_dict(raw)
    else:
        raise ValueError(f"the model config's 'ipcv' entry must be a dict of IPCVConfig fields, got {type(raw).__name__}")
    depth = int(hf_config.vision_config.depth)
    cfg = Schedule.build(cfg, depth, _defaults(arch)).config
    check_config(cfg)
    return cfg


def _check(inspect, architectures, model_config, *args, **kwargs):
    from . import ARCHITECTURES

    info, arch = inspect(architectures, model_config, *args, **kwargs)
    hf_config = getattr(model_config, "hf_config", None)
    if getattr(hf_config, "ipcv", None) is not None:
        if arch not in ARCHITECTURES:
            raise ValueError(f"the model config has an 'ipcv' entry, but ipcv's vLLM plug-in does not support "
                             f"architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
        ipcv_config_of(hf_config, arch)  # a bad config fails here, in the engine process, at start-up
    return info, arch


def guard_unsupported_architectures(registry) -> None:
    """Wrap ``registry.inspect_model_cls`` (the call by which vLLM's ``ModelConfig`` picks the model
    class at start-up) so that an ``ipcv`` entry on an unsupported architecture, or a bad ``ipcv``
    entry, fails there with a message naming it. Idempotent (plug-ins are loaded once per process)."""
    current = registry.inspect_model_cls
    if getattr(current, "_ipcv_guard", False):
        return
    guarded = functools.partial(_check, current)
    guarded._ipcv_guard = True
    registry.inspect_model_cls = guarded
