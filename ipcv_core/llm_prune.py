"""LLM-side visual-token pruning as pure tensor math: DART's duplication selection, FastV's attention
ranking, the per-span budget, and the index / mask bookkeeping that lets decoder layers >= K run on the
kept tokens only.  No model knowledge: ``ipcv_adapters.llm`` finds the spans, hooks the layers and owns
the per-call cache.

Conventions:

* A *span* is one image (or one video frame) in one row of the batch: ``(start, n)``, the positions
  ``start .. start + n - 1`` of its ``n`` visual tokens in the (padded) prompt.
* Budget: every span keeps ``num_keep(n, retain)`` = ``ceil(r·n)`` of its tokens (the project's K rule,
  :func:`ipcv_core.config.num_keep`); tokens outside the spans (text, special tokens, padding) are always
  kept.
* A *keep index* is ``(B, L')`` positions into the prompt, ascending per row; rows that keep fewer than
  ``L'`` tokens are filled on the left with position 0 and flagged invalid in the ``(B, L')`` *valid*
  mask (the same convention as left padding).

DART (Wen et al., arXiv 2502.11494), as the authors' code defines it: pivots are the image tokens of
the span with the largest L1 norm of their layer-(K-1) keys (all KV heads concatenated, after RoPE) and
the text tokens after the span with the largest key norm; each pivot in turn takes the candidates least
cosine-similar to it (on the final-norm'd input of layer K), which leave the candidate set; the span keeps
its image pivots and everything the pivots took.  Choices where paper / code are vague (see
:func:`dart_keep`): the per-pivot count is spread so that the span keeps exactly ``ceil(r·n)``; pivots
take their turns image pivots first, then text pivots, each group in ascending position.

FastV (Chen et al., arXiv 2403.06764): the visual tokens of a span are ranked by the attention they
receive, averaged over heads, from the prompt's last token in layer K-1; the top ``ceil(r·n)`` stay.
Only that one attention row is needed: :func:`last_query_attention` computes it from q / k.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import num_keep

__all__ = [
    "LLM_METHODS", "span_budget", "dart_keep", "fastv_keep", "last_query_attention", "keep_index",
    "gather_tokens", "prefill_mask", "decode_kv_index", "decode_mask",
]

LLM_METHODS = ("dart", "fastv")
Span = Tuple[int, int]


def span_budget(n: int, retain: float) -> int:
    """Tokens a span of ``n`` visual tokens keeps: ``ceil(r·n)``, at least 1, at most ``n``."""
    return num_keep(int(n), retain)


# --------------------------------------------------------------------------------------------- DART
def dart_keep(keys: torch.Tensor, states: torch.Tensor, span: Span, text_positions: torch.Tensor, budget: int,
              image_pivots: int = 4, text_pivots: int = 4, norm_p: float = 1.0) -> torch.Tensor:
    """DART's kept positions (ascending) for one span of one row.

    Args:
        keys: ``(L, C)`` the row's pivot metric vectors (DART: layer K-1's keys after RoPE, KV heads
            concatenated); pivots are the largest ``‖·‖_p`` (``norm_p``; DART: 1).
        states: ``(L, D)`` the vectors duplication is measured on (DART: the input of layer K through the
            model's final norm); cosine similarity.
        span: ``(start, n)``.
        text_positions: positions of the text tokens text pivots are drawn from (DART: the tokens after the
            image).
        budget: tokens the span keeps (``span_budget(n, r)``), ``1 <= budget <= n``.

    The span's ``min(image_pivots, budget)`` highest-norm tokens are image pivots, the
    ``min(text_pivots, len(text_positions))`` highest-norm text tokens text pivots.  The remaining
    ``m = budget - #image pivots`` slots are spread over the ``P`` pivots: ``m // P`` each, one more for
    the first ``m % P`` (DART's code uses ``ceil(K // P)`` per pivot, which misses the budget).  Pivot by
    pivot (image pivots, then text pivots, each in ascending position), the candidates — the span's
    tokens not yet kept — least cosine-similar to the pivot are kept and leave the candidates.
    """
    start, n = int(span[0]), int(span[1])
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be in [1, n] = [1, {n}], got {budget}")
    pos = torch.arange(start, start + n, device=keys.device)
    norms = keys[start:start + n].float().norm(p=norm_p, dim=-1)
    n_img = min(int(image_pivots), budget)
    img_piv = pos[norms.topk(n_img).indices].sort().values if n_img > 0 else pos[:0]
    text_positions = text_positions.to(keys.device)
    n_txt = min(int(text_pivots), int(text_positions.numel()))
    if n_txt > 0:
        t_norms = keys[text_positions].float().norm(p=norm_p, dim=-1)
        txt_piv = text_positions[t_norms.topk(n_txt).indices].sort().values
    else:
        txt_piv = text_positions[:0]
    pivots = torch.cat([img_piv, txt_piv])
    rest = budget - n_img
    if rest == 0 or pivots.numel() == 0:
        return img_piv
    base, extra = divmod(rest, int(pivots.numel()))
    cand = torch.ones(n, dtype=torch.bool, device=keys.device)
    cand[img_piv - start] = False
    s = F.normalize(states.float(), dim=-1)
    span_states = s[start:start + n]
    kept = [img_piv]
    for j, p in enumerate(pivots.tolist()):
        take = base + (1 if j < extra else 0)
        if take == 0:
            continue
        sim = span_states @ s[p]                       # cosine similarity to the pivot
        sim = sim.masked_fill(~cand, float("inf"))     # only candidates; least similar first
        chosen = sim.topk(take, largest=False).indices
        cand[chosen] = False
        kept.append(pos[chosen])
    return torch.cat(kept).sort().values


# --------------------------------------------------------------------------------------------- FastV
def fastv_keep(scores: torch.Tensor, span: Span, budget: int) -> torch.Tensor:
    """FastV's kept positions (ascending) for one span of one row: the ``budget`` tokens with the largest
    ``scores`` (``(L,)``, the head-averaged attention they receive from the last prompt token)."""
    start, n = int(span[0]), int(span[1])
    if not 1 <= budget <= n:
        raise ValueError(f"budget must be in [1, n] = [1, {n}], got {budget}")
    top = scores[start:start + n].float().topk(budget).indices
    return (top + start).sort().values


def last_query_attention(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], scaling: float,
                         query_index: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities of one query row per batch row: ``(B, Lk)``.

    ``query (B, H, Lq, d)``, ``key (B, Hkv, Lk, d)`` (grouped-query attention: head ``h`` reads KV head
    ``h // (H / Hkv)``), ``mask`` ``None`` (causal), bool (True = attend) or additive float, of shape
    ``(B or 1, 1, Lq, Lk)``; ``query_index (B,)`` the query row of each batch row.  Equals row
    ``query_index[b]`` of ``softmax(q kᵀ · scaling + mask)`` averaged over heads (the eager weights),
    computed for that row only: ``O(H · Lk · d)``.
    """
    B, H, Lq, d = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    b = torch.arange(B, device=query.device)
    qi = query_index.to(query.device).long()
    q = query[b, :, qi].float()                                            # (B, H, d)
    k = key.float().repeat_interleave(H // Hkv, dim=1)                    # (B, H, Lk, d)
    logits = torch.einsum("bhd,bhkd->bhk", q, k) * scaling
    if mask is None:
        q_pos = qi + (Lk - Lq)                                            # queries are the last Lq keys
        allowed = torch.arange(Lk, device=query.device)[None, :] <= q_pos[:, None]
        logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
    else:
        m = mask[..., :Lk].expand(B, -1, -1, -1)[b, 0, qi]                # (B, Lk)
        if m.dtype == torch.bool:
            logits = logits.masked_fill(~m[:, None, :], float("-inf"))
        else:
            logits = logits + m[:, None, :].float()
    return logits.softmax(dim=-1).mean(dim=1)


# --------------------------------------------------------------------------------------------- indices
def keep_index(keeps: Sequence[torch.Tensor], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row kept positions (each ascending) → ``(index (B, L'), valid (B, L'))``, rows shorter than
    ``L' = max`` filled on the left with position 0 / ``valid`` False."""
    width = max(int(k.numel()) for k in keeps)
    device = device if device is not None else keeps[0].device
    index = torch.zeros(len(keeps), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(keeps), width, dtype=torch.bool, device=device)
    for r, k in enumerate(keeps):
        c = int(k.numel())
        if c:
            index[r, width - c:] = k.to(device)
            valid[r, width - c:] = True
    return index, valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` gathered along its token dimension ``dim`` (the batch dimension is 0, size B or 1) with the
    per-row ``index (B, L')``."""
    B = index.shape[0]
    x = x.expand(B, *x.shape[1:]) if x.shape[0] == 1 and B > 1 else x
    shape = [B] + [1] * (x.dim() - 1)
    shape[dim] = index.shape[1]
    idx = index.view(shape).expand(*[s if i != dim else index.shape[1] for i, s in enumerate(x.shape)])
    return x.gather(dim, idx)


def _apply_fill(mask: torch.Tensor, kv_valid: torch.Tensor, q_fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Filler key columns never attended; filler query rows (``q_fill (B, Lq)``, prefill only) attend to
    themselves only, so they stay finite (a fully masked row would give NaN that leaks through V)."""
    B, _, Lq, Lk = mask.shape
    if mask.dtype == torch.bool:
        out = mask & kv_valid[:, None, None, :]
        if q_fill is not None and bool(q_fill.any()):
            eye = torch.eye(Lq, Lk, dtype=torch.bool, device=mask.device)[None, None]
            out = torch.where(q_fill[:, None, :, None], eye, out)
        return out
    lo = torch.finfo(mask.dtype).min
    out = mask.masked_fill(~kv_valid[:, None, None, :], lo)
    if q_fill is not None and bool(q_fill.any()):
        eye = torch.eye(Lq, Lk, dtype=torch.bool, device=mask.device)[None, None]
        diag = torch.where(eye, torch.zeros((), dtype=mask.dtype, device=mask.device),
                           torch.full((), lo, dtype=mask.dtype, device=mask.device))
        out = torch.where(q_fill[:, None, :, None], diag, out)
    return out


def prefill_mask(mask: Optional[torch.Tensor], index: torch.Tensor, valid: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention mask of the kept tokens in the prefill: ``mask (B|1, 1, L, L)`` (bool or additive
    float) gathered on both token dimensions, or, for ``None`` (plain causal), ``None`` again when every
    row is full and otherwise a causal bool mask over the kept positions."""
    full_rows = bool(valid.all())
    if mask is None:
        if full_rows:
            return None  # kept positions ascend: causal over positions == causal over the kept order
        pos = index
        mask = (pos[:, None, None, :] <= pos[:, None, :, None])
    else:
        B = index.shape[0]
        m = mask.expand(B, -1, -1, -1)
        L = m.shape[-1]
        rows = m.gather(2, index[:, None, :, None].expand(B, m.shape[1], index.shape[1], L))
        mask = rows.gather(3, index[:, None, None, :].expand(B, m.shape[1], index.shape[1], index.shape[1]))
    return mask if full_rows else _apply_fill(mask, valid, ~valid)


def decode_kv_index(index: torch.Tensor, prefill_length: int, total_length: int) -> torch.Tensor:
    """Prompt position of every entry of a pruned layer's cache after the prefill and
    ``total_length - prefill_length`` later tokens (appended in order, the same for every row)."""
    B = index.shape[0]
    later = torch.arange(prefill_length, total_length, device=index.device).expand(B, -1)
    return torch.cat([index, later], dim=1)


def decode_mask(mask: Optional[torch.Tensor], index: torch.Tensor, valid: torch.Tensor, prefill_length: int,
                q_length: int, total_length: int) -> Optional[torch.Tensor]:
    """The mask of a later forward (decoding ``q_length`` new tokens) for a pruned layer: the model's mask
    ``(B|1, 1, q, total_length)`` over all positions, with its key columns gathered to the entries of the
    pruned cache (filler columns masked).  ``None`` stays ``None`` when every row is full; otherwise a
    causal bool mask over the entries' positions."""
    kv = decode_kv_index(index, prefill_length, total_length)
    B = index.shape[0]
    kv_valid = torch.cat([valid, torch.ones(B, total_length - prefill_length, dtype=torch.bool,
                                            device=valid.device)], dim=1)
    if mask is None:
        if bool(valid.all()):
            return None
        q_pos = torch.arange(total_length - q_length, total_length, device=index.device)
        mask = kv[:, None, None, :] <= q_pos[None, None, :, None]
    else:
        m = mask[..., :total_length].expand(B, -1, -1, -1)
        mask = m.gather(3, kv[:, None, None, :].expand(B, m.shape[1], m.shape[2], kv.shape[1]))
    return mask if bool(valid.all()) else _apply_fill(mask, kv_valid, None)
