"""An attention function for packed towers that exports as one plain SDPA per block.

Qwen2-VL's ``VisionAttention`` runs its non-flash path per segment (``cu_seqlens`` -> ``.tolist()``
-> ``torch.split``): data-dependent, so ``torch.export`` either fails (sdpa) or bakes the number of
segments into the graph (eager).  Its flash path instead hands the whole packed sequence to the
attention function.  We register, through transformers' public ``AttentionInterface``, a function
under a name containing ``"flash"`` (so the tower takes that path) that ignores ``cu_seq_lens_*``
and calls ``F.scaled_dot_product_attention`` on the whole sequence.  The captured graph then has a
single dynamic token dimension, no ``aten.item``, no split and no mask — one SDPA per block, which
``ipcv_compile``'s rewrite turns into attention within each image / frame for the call's layout
(``ipcv.segment_attention``: the segment lengths are static per layout).  The captured stack alone
would attend across images: it is only ever run rewritten.

The name is only ever set on a *copy* of the tower's config held by the block-stack shells
(:func:`ipcv_adapters.base.attention_shell`); the user's tower keeps its own implementation.
Registering a new name changes nothing for any other name.
"""

from __future__ import annotations

import torch.nn.functional as F

__all__ = ["PACKED_SDPA", "register_packed_sdpa"]

PACKED_SDPA = "ipcv_flash_packed_sdpa"  # must contain "flash" (transformers' is_flash_attention_requested)


def packed_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """``(1, H, N, hd)`` q/k/v of the whole packed sequence -> ``(1, N, H, hd)``; no mask (the
    rewrite makes it per segment)."""
    out = F.scaled_dot_product_attention(query, key, value, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa` (idempotent); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_SDPA, packed_sdpa)
        _registered = True
    return PACKED_SDPA
