"""The lmms-eval model classes (this module imports lmms-eval; lmms-eval imports it through the
``lmms_eval.models`` entry point, :func:`ipcv_adapters.eval.manifests`).

Each class is lmms-eval's own wrapper for the family with :class:`IPCVModel` in front: our ``--model_args``
(:func:`~ipcv_adapters.eval.options.parse_options`) are validated and taken out before the wrapper loads the
weights, :func:`ipcv_adapters.compress` is installed on the loaded model, and a
:class:`~ipcv_adapters.eval.stats.CostMeter` records every generated sample.  After each ``generate_until`` the
per-sample means go to lmms-eval's metric log (``lmms_eval.models.model_utils.gen_metrics.log_metrics``), which
the evaluator writes into the results JSON as ``results["throughput"]["avg_ipcv_<field>"]``; with
``ipcv_stats=PATH`` every sample's record is also appended to PATH (JSON lines).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

from lmms_eval.models.chat.internvl_hf import InternVLHf as _InternVLHfChat
from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VLChat
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as _Qwen3_VLChat
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHf
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VL
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as _Qwen2_VL
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as _Qwen3_VL

from ..llm import compress, find_family
from ..llm.families import UnsupportedVLMError
from ..llm.install import _get_path, find_tower_path
from ..registry import find_adapter
from .options import EvalOptions, parse_options
from .stats import CostMeter, summarize

__all__ = ["IPCVModel", "IPCVQwen2VL", "IPCVQwen2_5VL", "IPCVQwen2_5VLChat", "IPCVQwen3VL", "IPCVQwen3VLChat",
           "IPCVInternVL3Chat", "IPCVLlavaOneVision", "IPCVLlavaOneVisionChat", "install"]

PREFIX = "ipcv_"


def _tower_depth(model) -> int:
    try:
        family = find_family(model)
    except UnsupportedVLMError:
        family = None
    return find_adapter(_get_path(model, find_tower_path(model, family))).depth


def install(model, opts: EvalOptions):
    """``compress`` ``model`` as ``opts`` say and put a :class:`CostMeter` on it; returns the meter."""
    cfg = opts.vit_config(_tower_depth(model)) if opts.compresses_vit else None
    compress(model, vit_retain=cfg.retain if cfg is not None else None, llm=opts.llm, llm_retain=opts.llm_retain,
             llm_layer=opts.llm_layer, vit_config=cfg)
    return CostMeter(model)


class IPCVModel:
    """Put in front of an lmms-eval wrapper class (``class X(IPCVModel, Wrapper)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        opts = parse_options(kwargs)  # before any weight is loaded: a bad value fails at once, naming it
        super().__init__(*args, **kwargs)
        self.ipcv_options = opts
        self.ipcv_meter = install(self.model, opts)

    def generate_until(self, requests) -> List[Any]:
        self.ipcv_meter.take()  # nothing left over from another call
        res = super().generate_until(requests)
        records = self.ipcv_meter.take()
        summary = summarize(records)
        if summary:
            log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0,
                        additional_metrics={PREFIX + k: v for k, v in summary.items()})
        if self.ipcv_options.stats_path and records:
            opts = self.ipcv_options.describe()
            with open(self.ipcv_options.stats_path, "a") as f:
                for r in records:
                    f.write(json.dumps({**r, "options": opts}) + "\n")
        return res

    def ipcv_info(self) -> Dict[str, Any]:
        return self.ipcv_options.describe()


class IPCVQwen2VL(IPCVModel, _Qwen2_VL):
    """lmms-eval's ``qwen2_vl`` (simple) with ipcv."""


class IPCVQwen2_5VL(IPCVModel, _Qwen2_5_VL):
    """lmms-eval's ``qwen2_5_vl`` (simple) with ipcv."""


class IPCVQwen2_5VLChat(IPCVModel, _Qwen2_5_VLChat):
    """lmms-eval's ``qwen2_5_vl`` (chat) with ipcv."""


class IPCVQwen3VL(IPCVModel, _Qwen3_VL):
    """lmms-eval's ``qwen3_vl`` (simple) with ipcv."""


class IPCVQwen3VLChat(IPCVModel, _Qwen3_VLChat):
    """lmms-eval's ``qwen3_vl`` (chat) with ipcv."""


class IPCVInternVL3Chat(IPCVModel, _InternVLHfChat):
    """lmms-eval's ``internvl_hf`` (chat only; transformers' ``InternVLForConditionalGeneration``, the ``-hf``
    checkpoints of InternVL3 / InternVL3.5, loaded in bf16 by lmms-eval) with ipcv.  The paper pairs InternVL3's
    tower with FastV in the language model (``llm=fastv``)."""


class IPCVLlavaOneVision(IPCVModel, _LlavaHf):
    """lmms-eval's ``llava_hf`` (simple; transformers' LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision) with ipcv."""


class IPCVLlavaOneVisionChat(IPCVModel, _LlavaHfChat):
    """lmms-eval's ``llava_hf`` (chat) with ipcv."""
