"""Loading a supported vision tower by name: a tiny random-weight one (``tiny:dinov2``,
``tiny:qwen2.5-vl``, ``tiny:llava``, ...) or a local folder / hub id of a checkpoint — a tower
checkpoint, or a VLM checkpoint whose tower is found through the adapter registry.  Model knowledge,
so it lives here; the CLI and ``ipcv tune`` call it.

There is no table of checkpoints here: what can be loaded is what the adapter registry
(:func:`ipcv_adapters.adapters`) supports.  A checkpoint's ``config.json`` says what it is:

1. its ``model_type`` is the config type of a supported tower class (``dinov2``,
   ``siglip_vision_model``, ``qwen2_5_vl_vision``, ...): that tower class is loaded;
2. else its ``architectures`` name a transformers class (``Qwen3VLForConditionalGeneration``,
   ``LlavaForConditionalGeneration``, ...): it is loaded and the first submodule an adapter
   recognises is the tower;
3. else its ``vision_config`` is the config of a supported tower class (a full ``SiglipModel`` /
   ``CLIPModel`` checkpoint): that tower class is loaded from it.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

from torch import nn

from .registry import adapters

__all__ = ["ModelLoadError", "TINY_MODELS", "allowed_models", "load_tower", "find_tower", "tower_classes"]


class ModelLoadError(ValueError):
    """The model name is not one ipcv can load (the message lists what is allowed)."""


def _tiny_name(family: str) -> str:
    """``qwen2_5_vl`` -> ``qwen2.5-vl``, ``llava_onevision`` -> ``llava-onevision``."""
    return family.replace("_5", ".5").replace("_", "-")


def _tiny_models() -> Dict[str, Tuple[str, str]]:
    """``tiny:`` name -> ("tower" | "vlm", family in :mod:`ipcv_adapters.testing`): every tiny tower,
    and every tiny VLM whose tower is not already listed under the VLM's own name (LLaVA: CLIP,
    LLaVA-OneVision: SigLIP, inside the VLM with its feature layer)."""
    from .testing import TOWERS, VLMS

    out = {_tiny_name(t): ("tower", t) for t in TOWERS}
    for v in VLMS:
        out.setdefault(_tiny_name(v), ("vlm", v))
    return out


#: ``tiny:`` name -> ("tower" | "vlm", family)
TINY_MODELS: Dict[str, Tuple[str, str]] = _tiny_models()


def _family_titles() -> str:
    names = []
    for a in reversed(adapters()):
        for c in a.tower_classes:
            names.append(c.rpartition(".")[2])
    return ", ".join(names)


def allowed_models() -> str:
    return ", ".join(f"tiny:{k}" for k in TINY_MODELS) + (
        f", or a local folder / hub id of a checkpoint of a supported tower ({_family_titles()}) or of a VLM "
        "holding one (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, InternVL (HF-native), LLaVA, LLaVA-OneVision, ...)")


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace("qwen2-5", "qwen2.5").replace("qwen3-5", "qwen3.5")


def tower_classes() -> List[type]:
    """The tower classes of every registered adapter (imported now), in registration order."""
    out = []
    for a in reversed(adapters()):
        for path in a.tower_classes:
            mod, _, cls = path.rpartition(".")
            try:
                out.append(getattr(importlib.import_module(mod), cls))
            except (ImportError, AttributeError):  # a transformers without this family
                continue
    return out


def _tower_class_for(model_type: Optional[str]) -> Optional[type]:
    if not model_type:
        return None
    for cls in tower_classes():
        if getattr(getattr(cls, "config_class", None), "model_type", None) == model_type:
            return cls
    return None


def load_tower(model: str) -> Tuple[nn.Module, str]:
    """``(tower nn.Module, kind)`` where kind is 'tiny' or the checkpoint's model_type."""
    import torch

    if model.startswith("tiny:"):
        name = _normalise(model[5:])
        if name not in TINY_MODELS:
            raise ModelLoadError(f"unknown tiny model {model!r}; allowed: {allowed_models()}")
        what, fam = TINY_MODELS[name]
        from . import testing

        if what == "tower":
            return testing.tiny_tower(fam), "tiny"
        vlm = testing.tiny_vlm(fam)
        return find_tower(vlm), "tiny"
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {model!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); allowed: {allowed_models()}")
    import transformers as tf

    mt = getattr(cfg, "model_type", "")
    cls = _tower_class_for(mt)  # 1. a tower checkpoint
    if cls is not None:
        return cls.from_pretrained(model, dtype=torch.float32).eval(), mt
    tried = []
    for arch in getattr(cfg, "architectures", None) or ():  # 2. a VLM (or any model) holding a tower
        arch_cls = getattr(tf, arch, None)
        if arch_cls is None:
            tried.append(f"{arch} (not in this transformers)")
            continue
        m = arch_cls.from_pretrained(model, dtype=torch.float32).eval()
        try:
            return find_tower(m), mt
        except ModelLoadError:
            tried.append(f"{arch} (holds no supported tower)")
    vision = getattr(cfg, "vision_config", None)  # 3. a tower inside a two-tower checkpoint (SiglipModel)
    cls = _tower_class_for(getattr(vision, "model_type", None))
    if cls is not None:
        return cls.from_pretrained(model, dtype=torch.float32).eval(), mt
    raise ModelLoadError(f"model {model!r} has model_type {mt!r}" + (f" (tried {', '.join(tried)})" if tried else "")
                         + f", which holds no vision tower ipcv has an adapter for; allowed: {allowed_models()}")


def find_tower(m: nn.Module) -> nn.Module:
    """The first submodule (``m`` itself first) that an ipcv adapter recognises."""
    for _, sub in m.named_modules():
        if any(a.matches(sub) for a in adapters()):
            return sub.eval()
    raise ModelLoadError(f"no supported vision tower inside {type(m).__name__}; allowed: {allowed_models()}")
