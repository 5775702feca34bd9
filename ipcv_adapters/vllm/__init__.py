"""IPCV as a vLLM plug-in: compresses vLLM's own Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers.

Installed with this distribution as the entry point ``vllm.general_plugins: ipcv =
ipcv_adapters.vllm:register``; vLLM calls :func:`register` in every process (engine core, workers).
It registers, for each supported architecture, a subclass of vLLM's model class
(:mod:`ipcv_adapters.vllm.models`, imported lazily by vLLM's registry) that compresses the vision
tower when the model's config carries an ``ipcv`` entry::

    LLM(model=path, hf_overrides={"ipcv": {"retain": 0.35}})
    python -m vllm.entrypoints.openai.api_server --model PATH --hf-overrides '{"ipcv": {"retain": 0.35}}'

Any :class:`~ipcv_core.IPCVConfig` field may be given; ``prune_layer`` / ``as_depth`` left out take
the Qwen family's defaults (the paper's ``l_p=3, Δ=7``, clipped to the tower's depth), as in the
transformers adapters. Without the ``ipcv`` entry the subclasses are vLLM's classes unchanged.

Importing this package imports neither vLLM nor the model module; :func:`register` imports vLLM.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "register"]

#: vLLM architecture name -> the subclass this plug-in registers for it
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "ipcv_adapters.vllm.models:IPCVQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "ipcv_adapters.vllm.models:IPCVQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "ipcv_adapters.vllm.models:IPCVQwen3VLForConditionalGeneration",
}


def register() -> None:
    """vLLM's ``general_plugins`` hook: register the IPCV subclasses (idempotent; called in every
    process) and make an ``ipcv`` entry on any other architecture a start-up error."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
    from .config import guard_unsupported_architectures

    guard_unsupported_architectures(ModelRegistry)
