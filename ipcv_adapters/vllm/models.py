"""vLLM model classes with IPCV in the vision tower: subclasses of vLLM's Qwen2-VL / Qwen2.5-VL /
Qwen3-VL classes (registered by :func:`ipcv_adapters.vllm.register`; this module imports vLLM).

With an ``ipcv`` entry in the model config, ``__init__`` narrows the class of the tower vLLM built
(``self.visual``) to a subclass whose ``forward`` runs :func:`~ipcv_adapters.vllm.tower.ipcv_forward`.
The tower object, its parameters, their names, weight loading, LoRA targets and tensor-parallel
sharding stay vLLM's; only ``forward`` differs. Without the entry nothing changes: the class
behaves as vLLM's, bit for bit.
"""

from __future__ import annotations

import logging
from typing import Dict

from torch import nn
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from .config import ipcv_config_of
from .tower import FAMILIES, VisionFamily, ipcv_forward

__all__ = ["IPCVQwen2VLForConditionalGeneration", "IPCVQwen2_5_VLForConditionalGeneration",
           "IPCVQwen3VLForConditionalGeneration", "ipcv_tower_class"]

logger = logging.getLogger("vllm.plugins.ipcv")  # vLLM configures its "vllm" loggers: messages appear in its log
_TOWER_CLASSES: Dict[type, type] = {}


def ipcv_tower_class(base: type, family: VisionFamily) -> type:
    """The subclass of vLLM tower class ``base`` whose ``forward`` compresses (one per base class).
    Its instances read their configuration from ``self.ipcv_config`` (set once, at model init)."""
    cls = _TOWER_CLASSES.get(base)
    if cls is None:
        def forward(self, x, grid_thw=None, *, encoder_metadata=None):
            if encoder_metadata is not None:  # encoder CUDA graphs are switched off for compressed models
                logger.warning("ipcv: the encoder CUDA-graph path reached a compressed tower; running it uncompressed")
                return base.forward(self, x, grid_thw, encoder_metadata=encoder_metadata)
            return ipcv_forward(self, family, self.ipcv_config, x, grid_thw,
                                lambda x_, g: base.forward(self, x_, g))

        cls = type(f"IPCV{base.__name__}", (base,), {"forward": forward, "__module__": __name__,
                                                     "__doc__": f"{base.__name__} with IPCV ({__name__})."})
        _TOWER_CLASSES[base] = cls
    return cls


class _IPCVModel:
    """Mixin: after vLLM's ``__init__``, compress ``self.visual`` if the config has an ``ipcv`` entry."""

    ipcv_family: str = ""
    ipcv_architecture: str = ""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        cfg = ipcv_config_of(vllm_config.model_config.hf_config, self.ipcv_architecture)
        if cfg is None:
            return
        visual: nn.Module = self.visual
        visual.__class__ = ipcv_tower_class(type(visual), FAMILIES[self.ipcv_family])
        visual.ipcv_config = cfg
        comp = vllm_config.compilation_config
        if getattr(comp, "cudagraph_mm_encoder", False):
            comp.cudagraph_mm_encoder = False
            logger.warning("ipcv: encoder CUDA graphs switched off for this model (their static shapes would "
                           "replay the uncompressed tower; IPCV changes the row count inside the tower per image)")
        logger.info("ipcv: %s vision tower compressed: %s", self.ipcv_architecture, cfg)


class IPCVQwen2VLForConditionalGeneration(_IPCVModel, Qwen2VLForConditionalGeneration):
    ipcv_family, ipcv_architecture = "qwen2_vl", "Qwen2VLForConditionalGeneration"


class IPCVQwen2_5_VLForConditionalGeneration(_IPCVModel, Qwen2_5_VLForConditionalGeneration):
    ipcv_family, ipcv_architecture = "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"


class IPCVQwen3VLForConditionalGeneration(_IPCVModel, Qwen3VLForConditionalGeneration):
    ipcv_family, ipcv_architecture = "qwen3_vl", "Qwen3VLForConditionalGeneration"
