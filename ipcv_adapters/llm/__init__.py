"""LLM-side visual-token pruning (DART, FastV) on top of IPCV's vision tower, installed on a loaded
transformers VLM by :func:`compress`; ``generate()`` is then called unchanged.

    import ipcv_adapters
    ipcv_adapters.compress(model, vit_retain=0.35, llm="dart", llm_retain=0.35, llm_layer=2)
    out = model.generate(**inputs)

The tensor math is :mod:`ipcv_core.llm_prune`; this package holds the model knowledge: the families
(:mod:`.families`: spans of images / video frames, where the layers are), the per-call cache
(:mod:`.cache`), FastV's attention function (:mod:`.attention`) and the hooks (:mod:`.install`).
"""

from .cache import LLMPruneCache, PruneState
from .families import (
    LLMFamily, UnsupportedVLMError, families, find_family, register_family, supported_models, token_runs,
)
from .install import Installation, compress, installed, uninstall

__all__ = [
    "compress", "uninstall", "installed", "Installation", "LLMPruneCache", "PruneState",
    "LLMFamily", "UnsupportedVLMError", "families", "find_family", "register_family", "supported_models", "token_runs",
]
