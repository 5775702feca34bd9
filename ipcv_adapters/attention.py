"""An attention function for packed towers that exports as one SDPA per block.

Qwen2-VL's ``VisionAttention`` runs its non-flash path per segment (``cu_seqlens`` -> ``.tolist()``
-> ``torch.split``): data-dependent, so ``torch.export`` either fails (sdpa) or bakes the number of
segments into the graph (eager).  Its flash path instead hands the whole packed sequence to the
attention function.  We register, through transformers' public ``AttentionInterface``, a function
under a name containing ``"flash"`` (so the tower takes that path) that ignores ``cu_seq_lens_*``
and calls ``F.scaled_dot_product_attention`` with a block-diagonal bool mask passed as the keyword
``ipcv_attn_mask``.  The graph then has a single dynamic token dimension, no ``aten.item`` and no
split, and one SDPA node per block — what ``ipcv_compile`` locates and rewrites.

The name is only ever set on a *copy* of the tower's config held by the block-stack shells
(:func:`ipcv_adapters.base.attention_shell`); the user's tower keeps its own implementation.
Registering a new name changes nothing for any other name.
"""

from __future__ import annotations

import torch.nn.functional as F

__all__ = ["MASKED_VARLEN", "MASK_KWARG", "register_masked_varlen"]

MASKED_VARLEN = "ipcv_flash_masked_sdpa"  # must contain "flash" (transformers' is_flash_attention_requested)
MASK_KWARG = "ipcv_attn_mask"


def masked_varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """``(1, H, N, hd)`` q/k/v and a ``(1, 1, N, N)`` bool mask (True = attend) -> ``(1, N, H, hd)``."""
    mask = kwargs.get(MASK_KWARG)
    if mask is None:
        raise ValueError(
            f"attention implementation {MASKED_VARLEN!r} needs the block-diagonal mask as keyword {MASK_KWARG!r}"
        )
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_masked_varlen() -> str:
    """Register :func:`masked_varlen_sdpa` (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(MASKED_VARLEN, masked_varlen_sdpa)
        _registered = True
    return MASKED_VARLEN
