"""ipcv models for lmms-eval (the benchmark harness of the IPCV, DART and VisionZip papers).

This distribution registers them through lmms-eval's entry-point group ``lmms_eval.models``
(:func:`manifests`): no fork of lmms-eval, no environment variable::

    pip install "ipcv[eval]"
    lmms_eval --model ipcv_qwen2_vl \\
        --model_args pretrained=Qwen/Qwen2-VL-7B-Instruct,retain=0.35,method=ipcv,llm=dart \\
        --tasks mme,pope --batch_size 1 --output_path results/

Models (each a subclass of lmms-eval's own wrapper for the family, so prompts, media handling and
generation settings are lmms-eval's): ``ipcv_qwen2_vl`` (lmms-eval's ``qwen2_vl``, simple),
``ipcv_qwen2_5_vl`` (``qwen2_5_vl`` chat + simple), ``ipcv_qwen3_vl`` (``qwen3_vl`` chat + simple),
``ipcv_internvl3`` (``internvl_hf``, chat: transformers' InternVL3 / InternVL3.5 ``-hf`` checkpoints) and
``ipcv_llava_onevision`` (``llava_hf`` chat + simple: transformers' LLaVA-OneVision, LLaVA-1.5, LLaVA-NeXT).
The options (:mod:`.options`) are taken out of ``--model_args`` before lmms-eval's wrapper sees them;
the cost records (:mod:`.stats`) land in the results JSON under ``throughput`` as ``avg_ipcv_*``.

Importing this package does not import lmms-eval (only :mod:`.lmms`, the module lmms-eval loads, does).
"""

from .options import LLM_METHODS, VIT_METHODS, EvalOptions, parse_options
from .stats import CostMeter, llm_dims, summarize, tower_dims

#: lmms-eval model id -> (simple class, chat class) in :mod:`ipcv_adapters.eval.lmms`
MODELS = {
    "ipcv_qwen2_vl": ("IPCVQwen2VL", None),
    "ipcv_qwen2_5_vl": ("IPCVQwen2_5VL", "IPCVQwen2_5VLChat"),
    "ipcv_qwen3_vl": ("IPCVQwen3VL", "IPCVQwen3VLChat"),
    "ipcv_internvl3": (None, "IPCVInternVL3Chat"),
    "ipcv_llava_onevision": ("IPCVLlavaOneVision", "IPCVLlavaOneVisionChat"),
}


def manifests():
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per model of :data:`MODELS` (lmms-eval
    calls it; lmms-eval is imported here, when it asks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    mod = __name__ + ".lmms"
    return [ModelManifest(model_id=mid, simple_class_path=f"{mod}.{s}" if s else None,
                          chat_class_path=f"{mod}.{c}" if c else None) for mid, (s, c) in MODELS.items()]


__all__ = ["MODELS", "manifests", "EvalOptions", "parse_options", "VIT_METHODS", "LLM_METHODS",
           "CostMeter", "summarize", "llm_dims", "tower_dims"]
