"""Segment-local attention for packed sequences: each image / frame attends only to its own rows,
with no ``N x N`` mask.

Rows of a packed sequence are grouped into segments with static lengths.  Runs of consecutive
segments with the same (query, key) lengths — the frames of a video, same-size images — are
attended as one batched SDPA ``(B * S_g, H, L, E)``; other segments one by one.  Cost
``sum(q_i * kv_i)`` instead of ``N^2``, and no tensor spans two segments.

``q_prefix=True``: the queries are not compact but the first ``q_i`` rows of each key segment of
``q`` (``q`` has the keys' rows) — the layout of an attention-stabilisation block whose rows are
arranged per segment as ``[kept rows; reconstructed rows]``.

``q_groups`` / ``kv_groups``: an id per query / key row (e.g. the attention window of a
Qwen2.5-VL token); within each segment a query attends only to keys of its own group — the
window attention of a frame whose kept rows no longer form whole windows.  The group mask is
built per segment (``q_i x kv_i``), never across segments.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["segment_runs", "segment_attention", "segment_concat", "segment_prefix"]


def segment_runs(q_lengths: Sequence[int], kv_lengths: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``[(q_len, kv_len, count), ...]``: runs of consecutive segments with equal lengths."""
    if len(q_lengths) != len(kv_lengths):
        raise ValueError(f"q_lengths {list(q_lengths)} and kv_lengths {list(kv_lengths)} must have one entry per segment")
    runs: List[Tuple[int, int, int]] = []
    for ql, kl in zip(q_lengths, kv_lengths):
        if runs and runs[-1][0] == ql and runs[-1][1] == kl:
            runs[-1] = (ql, kl, runs[-1][2] + 1)
        else:
            runs.append((ql, kl, 1))
    return runs


def _split_rows(t: torch.Tensor, off: int, length: int, count: int, take: Optional[int] = None) -> torch.Tensor:
    """Rows ``[off, off + count*length)`` of ``t (B, H, L, E)`` as ``(B*count, H, take or length, E)``."""
    B, H, _, E = t.shape
    x = t[:, :, off:off + count * length]
    if count == 1:
        return x if take is None or take == length else x[:, :, :take]
    x = x.reshape(B, H, count, length, E)
    if take is not None and take != length:
        x = x[:, :, :, :take]
    return x.transpose(1, 2).reshape(B * count, H, x.shape[3], E)


def _mask_blocks(m: torch.Tensor, q_off: int, ql: int, kv_off: int, kl: int, count: int, q_stride: int) -> torch.Tensor:
    """The ``count`` diagonal blocks of a mask ``(Bm, Hm, Lq, Lkv)`` as ``(Bm*count, Hm, ql, kl)``;
    a dim of size 1 broadcasts (e.g. a per-key bias ``(B, 1, 1, Lkv)``) and is not sliced."""
    def block(j):
        b = m
        if m.shape[-2] != 1:
            b = b[:, :, q_off + j * q_stride:q_off + j * q_stride + ql]
        if m.shape[-1] != 1:
            b = b[..., kv_off + j * kl:kv_off + (j + 1) * kl]
        return b

    blocks = [block(j) for j in range(count)]
    if count == 1:
        return blocks[0]
    Bm, Hm = m.shape[0], m.shape[1]
    return torch.stack(blocks, dim=1).reshape(Bm * count, Hm, *blocks[0].shape[-2:])


def _group_mask(qg: torch.Tensor, kg: torch.Tensor, B: int, q_off: int, ql: int, kv_off: int, kl: int, count: int,
                q_stride: int) -> torch.Tensor:
    """``(B*count, 1, ql, kl)`` bool: query and key rows of the same group, per segment of a run."""
    qg = qg.reshape(-1, qg.shape[-1]) if qg.dim() > 1 else qg.unsqueeze(0)
    kg = kg.reshape(-1, kg.shape[-1]) if kg.dim() > 1 else kg.unsqueeze(0)
    blocks = []
    for j in range(count):
        a = qg[:, q_off + j * q_stride:q_off + j * q_stride + ql]
        b = kg[:, kv_off + j * kl:kv_off + (j + 1) * kl]
        blocks.append(a.unsqueeze(-1) == b.unsqueeze(-2))  # (Bg, ql, kl)
    m = torch.stack(blocks, dim=1) if count > 1 else blocks[0].unsqueeze(1)  # (Bg, count, ql, kl)
    m = m.expand(B, *m.shape[1:]) if m.shape[0] == 1 and B > 1 else m
    return m.reshape(B * count, 1, ql, kl)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    *,
    q_lengths: Sequence[int],
    kv_lengths: Sequence[int],
    q_prefix: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    q_groups: Optional[torch.Tensor] = None,
    kv_groups: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of each segment's queries over the same segment's keys.

    ``q (B, H, Lq, E)`` or ``(H, Lq, E)``, ``k``/``v`` likewise with ``Lkv = sum(kv_lengths)``;
    ``Lq = sum(q_lengths)`` (or ``Lkv`` with ``q_prefix``).  ``attn_mask``: an SDPA mask over the
    whole rows (bool or float; only its diagonal blocks are used).  Returns ``(B, H, sum(q_lengths),
    E)`` (or 3-D), the segments' queries in order.
    """
    if kv_groups is not None and q_groups is None and not q_prefix:
        if list(q_lengths) != list(kv_lengths):
            raise ValueError("segment_attention: q_groups are needed when the queries are not the keys' rows")
        q_groups = kv_groups
    three = q.dim() == 3
    if three:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask[None, None]
    B, Hq = q.shape[0], q.shape[1]
    outs = []
    q_off = kv_off = 0
    for ql, kl, count in segment_runs(q_lengths, kv_lengths):
        if q_prefix:
            qs = _split_rows(q, kv_off, kl, count, take=ql)
        else:
            qs = _split_rows(q, q_off, ql, count)
        ks, vs = _split_rows(k, kv_off, kl, count), _split_rows(v, kv_off, kl, count)
        ms = None
        if attn_mask is not None:
            m = attn_mask.expand(B, *attn_mask.shape[1:]) if attn_mask.shape[0] == 1 and B > 1 else attn_mask
            ms = _mask_blocks(m, kv_off if q_prefix else q_off, ql, kv_off, kl, count, kl if q_prefix else ql)
        if kv_groups is not None:
            if q_prefix:  # the queries are rows of the keys: their groups too
                gm = _group_mask(kv_groups, kv_groups, B, kv_off, ql, kv_off, kl, count, kl)
            else:
                gm = _group_mask(q_groups, kv_groups, B, q_off, ql, kv_off, kl, count, ql)
            ms = gm if ms is None else (ms & gm if ms.dtype == torch.bool else ms.masked_fill(~gm, float("-inf")))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ms, scale=scale, enable_gqa=enable_gqa)
        if count > 1:
            o = o.reshape(B, count, Hq, ql, o.shape[-1]).transpose(1, 2).reshape(B, Hq, count * ql, o.shape[-1])
        outs.append(o)
        q_off += count * ql
        kv_off += count * kl
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.squeeze(0) if three else out


def segment_concat(a: torch.Tensor, b: torch.Tensor, a_lengths: Sequence[int], b_lengths: Sequence[int],
                   dim: int) -> torch.Tensor:
    """Rows of ``a`` and ``b`` (segments back to back in each, lengths ``a_lengths`` / ``b_lengths``
    along ``dim``) interleaved per segment: ``[a_0; b_0; a_1; b_1; ...]``.  Equal runs are
    concatenated as one reshape; no index tensor."""
    dim = dim % a.dim()
    parts = []
    ao = bo = 0
    for al, bl, count in segment_runs(a_lengths, b_lengths):
        xa = a.narrow(dim, ao, count * al)
        xb = b.narrow(dim, bo, count * bl)
        if count > 1:
            sa = list(a.shape[:dim]) + [count, al] + list(a.shape[dim + 1:])
            sb = list(b.shape[:dim]) + [count, bl] + list(b.shape[dim + 1:])
            merged = torch.cat([xa.reshape(sa), xb.reshape(sb)], dim=dim + 1)
            parts.append(merged.reshape(list(a.shape[:dim]) + [count * (al + bl)] + list(a.shape[dim + 1:])))
        else:
            parts += [xa, xb]
        ao += count * al
        bo += count * bl
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def segment_prefix(x: torch.Tensor, lengths: Sequence[int], take: Sequence[int], dim: int) -> torch.Tensor:
    """The first ``take[i]`` rows of each segment (lengths ``lengths``, back to back along ``dim``)
    of ``x``: the kept rows of rows arranged ``[kept_i; removed_i]`` per segment.  Equal runs are one
    reshape + narrow."""
    dim = dim % x.dim()
    before, after = list(x.shape[:dim]), list(x.shape[dim + 1:])
    parts = []
    off = 0
    for t, n, count in segment_runs(take, lengths):
        span = x.narrow(dim, off, count * n)
        if count == 1:
            parts.append(span.narrow(dim, 0, t))
        else:
            grouped = span.reshape(before + [count, n] + after).narrow(dim + 1, 0, t)
            parts.append(grouped.reshape(before + [count * t] + after))
        off += count * n
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
