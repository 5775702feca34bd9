"""Loading a supported vision tower by name: a tiny random-weight one (``tiny:dinov2``) or a local
folder / hub id of a checkpoint (the tower inside a VLM checkpoint is found through the adapter
registry).  Model knowledge, so it lives here; the CLI and ``ipcv tune`` call it."""

from __future__ import annotations

from typing import Tuple

from torch import nn

from .registry import adapters

__all__ = ["ModelLoadError", "TINY_MODELS", "allowed_models", "load_tower", "find_tower"]

TINY_MODELS = {"qwen2-vl": "qwen2_vl", "internvl": "internvl", "dinov2": "dinov2", "siglip": "siglip", "clip": "clip"}
# checkpoint model_type -> the transformers class whose tower is used
CHECKPOINT_CLASSES = {
    "dinov2": "Dinov2Model", "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "clip": "CLIPVisionModel", "clip_vision_model": "CLIPVisionModel",
    "qwen2_vl": "Qwen2VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
}


class ModelLoadError(ValueError):
    """The model name is not one ipcv can load (the message lists what is allowed)."""


def allowed_models() -> str:
    return ", ".join(f"tiny:{k}" for k in TINY_MODELS) + (
        ", or a local folder / hub id of a Qwen2-VL, InternVL (HF-native), DINOv2, SigLIP or CLIP checkpoint")


def load_tower(model: str) -> Tuple[nn.Module, str]:
    """``(tower nn.Module, kind)`` where kind is 'tiny' or the HF model_type."""
    import torch

    if model.startswith("tiny:"):
        name = model[5:].lower().replace("_", "-")
        if name not in TINY_MODELS:
            raise ModelLoadError(f"unknown tiny model {model!r}; allowed: {allowed_models()}")
        from .testing import tiny_tower

        return tiny_tower(TINY_MODELS[name]), "tiny"
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {model!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); allowed: {allowed_models()}")
    mt = getattr(cfg, "model_type", "")
    import transformers as tf

    if mt not in CHECKPOINT_CLASSES:
        raise ModelLoadError(f"model {model!r} has model_type {mt!r}, which ipcv has no adapter for; "
                             f"allowed: {allowed_models()}")
    m = getattr(tf, CHECKPOINT_CLASSES[mt]).from_pretrained(model, dtype=torch.float32).eval()
    return find_tower(m), mt


def find_tower(m: nn.Module) -> nn.Module:
    """The first submodule (``m`` itself first) that an ipcv adapter recognises."""
    for _, sub in m.named_modules():
        if any(a.matches(sub) for a in adapters()):
            return sub.eval()
    raise ModelLoadError(f"no supported vision tower inside {type(m).__name__}; allowed: {allowed_models()}")
