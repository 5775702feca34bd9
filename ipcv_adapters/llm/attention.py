"""FastV's one attention row, through transformers' ``AttentionInterface``.

``register(base)`` registers ``"ipcv_fastv_<base>"`` (``base`` = ``"sdpa"`` or ``"eager"``) as an
attention function and its mask function (the base's, so masks are built exactly as before).  The
function runs the base implementation unchanged; only when the decoder layer's kwargs carry
:data:`SINK_KWARG` — the pre-hook of layer K-1 adds it during a pruned prefill, with the call's
:class:`~ipcv_adapters.llm.cache.PruneState` as value — it also computes the head-averaged attention
probabilities of each row's last prompt token (``ipcv_core.llm_prune.last_query_attention``, one row,
not the ``L × L`` map) and stores them in that state.  Every other layer and call is plain SDPA / eager.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from ipcv_core.llm_prune import last_query_attention

__all__ = ["SINK_KWARG", "BASES", "register", "implementation_name"]

SINK_KWARG = "ipcv_fastv_sink"
BASES = ("sdpa", "eager")


def implementation_name(base: str) -> str:
    return f"ipcv_fastv_{base}"


def _base_function(base: str, module) -> Callable:
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # "eager" is not in the AttentionInterface: every modeling file has its own eager_attention_forward
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(f"no eager_attention_forward next to {type(module).__qualname__}")
    return fn


def _make(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        sink = kwargs.pop(SINK_KWARG, None)
        out = _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        if sink is not None:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            with torch.no_grad():
                sink.fastv_scores = last_query_attention(query, key, attention_mask, float(scaling), sink.last_index)
        return out

    attention.__name__ = implementation_name(base)
    return attention


def register(base: str) -> str:
    """Register the FastV-recording wrapper of ``base``; returns its implementation name."""
    if base not in BASES:
        raise NotImplementedError(
            f"FastV needs the LLM's attention implementation to be one of {BASES}; got {base!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = implementation_name(base)
    AttentionInterface.register(name, _make(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
