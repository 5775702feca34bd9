"""The per-call state of LLM-side pruning lives in the call's cache: :class:`LLMPruneCache`, a
``DynamicCache`` whose decoder layers >= K hold only the kept tokens.

Layout after a pruned prefill of length ``L`` and ``t`` generated tokens:

* layers ``0 .. K-1``: ``L + t`` entries, as without pruning (``get_seq_length()`` reads layer 0, so
  positions and masks of later tokens are the unpruned ones);
* layers ``K ..``: ``L' + t`` entries.  Entry ``j < L'`` of row ``b`` is the prompt token at position
  ``keep_index[b, j]`` (kept tokens ascending; rows that keep fewer than ``L'`` tokens are filled on the
  left, ``keep_valid[b, j]`` False — a padded cache whose valid entries per row equal the row's kept
  count); entries ``>= L'`` are the generated tokens.  Keys were rotated with the tokens' original
  (M-)RoPE positions, so decoding needs no position change, only the key columns of its mask
  gathered to these entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import DynamicCache

__all__ = ["PruneState", "LLMPruneCache"]

Span = Tuple[int, int]


@dataclass
class PruneState:
    """What one call prunes and what it kept (one object per call, held by its cache)."""

    method: str                      # "dart" | "fastv"
    retain: float
    layer: int                       # K: first decoder layer that sees only the kept tokens
    spans: List[List[Span]]          # per row, the prunable visual spans
    prefill_length: int              # L
    last_index: torch.Tensor         # (B,) each row's last prompt token (FastV's query; always kept)
    options: Dict[str, Any] = field(default_factory=dict)
    ephemeral: bool = False          # the cache was made for a call without one (use_cache=False)
    # set at layer K of the prefill
    keep_index: Optional[torch.Tensor] = None   # (B, L')
    keep_valid: Optional[torch.Tensor] = None   # (B, L')
    # transient, within one forward
    fastv_scores: Optional[torch.Tensor] = None  # (B, L) from layer K-1's attention
    current: Dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> bool:
        return self.keep_index is not None

    def kept_counts(self) -> torch.Tensor:
        """Per row, prompt tokens the pruned layers keep."""
        return self.keep_valid.sum(dim=1)

    def _rows(self, fn) -> None:
        self.last_index = fn(self.last_index)
        if self.keep_index is not None:
            self.keep_index, self.keep_valid = fn(self.keep_index), fn(self.keep_valid)


class LLMPruneCache(DynamicCache):
    """A ``DynamicCache`` that also holds one call's :class:`PruneState` (``prune_state``).

    ``compress`` makes the cache of every pruned call one of these: ``generate``'s own ``DynamicCache`` (or
    one a caller passes) is adopted in place at the start of the prefill — its class becomes this
    subclass, so the caller's object is the pruned cache — and a call without a cache gets a new one.
    Batch reordering (beam search), repeats and selection apply to the state's per-row tensors too;
    ``crop`` may remove generated tokens but not cut into the pruned prompt."""

    prune_state: Optional[PruneState] = None

    @classmethod
    def adopt(cls, cache: DynamicCache) -> "LLMPruneCache":
        if not isinstance(cache, LLMPruneCache):
            if type(cache) is not DynamicCache:
                raise NotImplementedError(
                    f"LLM-side pruning needs a DynamicCache (cache_implementation None / 'dynamic'); got "
                    f"{type(cache).__name__}")
            cache.__class__ = cls
        cache.prune_state = None
        return cache

    # ------------------------------------------------------------------ inspection
    def layer_lengths(self) -> List[int]:
        """Entries per layer (the batch's padded length)."""
        return [layer.get_seq_length() for layer in self.layers]

    def valid_entries(self, layer_idx: int) -> torch.Tensor:
        """``(B,)`` non-filler entries of layer ``layer_idx`` per row (prompt tokens kept plus generated
        tokens; every entry for layers < K)."""
        n = self.layers[layer_idx].get_seq_length()
        st = self.prune_state
        B = self.layers[layer_idx].keys.shape[0]
        if st is None or not st.pruned or layer_idx < st.layer:
            return torch.full((B,), n, dtype=torch.long)
        extra = n - st.keep_index.shape[1]
        return st.kept_counts().cpu() + extra

    # ------------------------------------------------------------------ batch-level operations
    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self.prune_state is not None:
            self.prune_state._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.prune_state is not None:
            self.prune_state._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self.prune_state is not None:
            self.prune_state._rows(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        st = self.prune_state
        if st is not None and st.pruned and tokens_to_remove != 0:
            generated = self.get_seq_length() - st.prefill_length
            if tokens_to_remove > 0 or -tokens_to_remove > generated:
                raise NotImplementedError(
                    f"LLMPruneCache.crop can remove up to the {generated} generated tokens (a negative count), not "
                    f"cut into the pruned prompt; got {tokens_to_remove}")
        super().crop(tokens_to_remove)

    def reset(self):
        super().reset()
        self.prune_state = None
