"""ipcv_adapters: all model knowledge (which modules are blocks / attention / FFN, segments,
side inputs, exportable block stacks, preparation and finishing).  ``ipcv_core`` and
``ipcv_compile`` never name a model.

    tower = ipcv_compile.rewrite(model.model.visual, retain=0.35)   # -> IPCVTower (drop-in)

Supported towers: Qwen2-VL (``Qwen2VisionTransformerPretrainedModel``), Qwen2.5-VL
(``Qwen2_5_VisionTransformerPretrainedModel``), Qwen3-VL (``Qwen3VLVisionModel``), Qwen3.5
(``Qwen3_5VisionModel``), InternVL3 (``InternVLVisionModel``), ``Dinov2Model``,
``SiglipVisionModel`` (LLaVA-OneVision, Gemma3), ``CLIPVisionModel`` (LLaVA-1.5).  New ones:
subclass :class:`TowerAdapter` and decorate with :func:`register_adapter`.
"""

from ipcv_core import __version__

from .base import OutputRequest, Prepared, TowerAdapter, attention_shell, pop_output_request, shells
from .registry import (
    ShallowDefaultsWarning,
    UnsupportedTowerError,
    adapters,
    find_adapter,
    register_adapter,
    rewrite_with_adapter,
    run_eager,
    supported_towers,
)
from .tower import IPCVTower

# built-in adapters (importing registers them; transformers is imported only when a tower is used)
from . import qwen2_vl as _qwen2_vl  # noqa: E402,F401
from . import internvl as _internvl  # noqa: E402,F401
from . import dinov2 as _dinov2  # noqa: E402,F401
from . import clip_siglip as _clip_siglip  # noqa: E402,F401
from . import qwen_family as _qwen_family  # noqa: E402,F401



def compress(model, *args, **kwargs):
    """IPCV in the vision tower + DART / FastV in the language model, installed in place; returns the
    model.  ``compress(model, vit_retain=0.35, llm="dart" | "fastv" | None, llm_retain=0.35,
    llm_layer=2)`` — see :func:`ipcv_adapters.llm.compress` for every option."""
    from .llm import compress as _compress  # imports transformers only when used

    return _compress(model, *args, **kwargs)


__all__ = [
    "__version__", "compress",
    "OutputRequest", "Prepared", "TowerAdapter", "attention_shell", "pop_output_request", "shells",
    "ShallowDefaultsWarning", "UnsupportedTowerError", "adapters", "find_adapter", "register_adapter", "rewrite_with_adapter",
    "run_eager", "supported_towers", "IPCVTower",
]
