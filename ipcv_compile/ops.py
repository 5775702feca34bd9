"""Graph-level composite ops inserted by the rewrite: thin wrappers over ipcv_core's pure functions
that accept the model's own hidden-state layout (``(B, N, D)``, or packed ``(N, D)`` with
``token_dim=0``).  Every argument that changes the graph's structure is static (keyword-only), so
each call traces to a fixed set of ATen ops (torch.export / ONNX / inductor).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ipcv_core.config import IPCVConfig
from ipcv_core.prune import kept_layout, layout_coords, prune_tokens, stage_keep_counts
from ipcv_core.reconstruct import ngr, restore
from ipcv_core.segments import SegmentLayout, plan_segments
from ipcv_core.selection import gather_rows, is_tracing

__all__ = ["ipcv_prune", "ipcv_reconstruct", "ipcv_gather_tokens", "ipcv_attention_bias", "ipcv_key_metric"]


def _bnd(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    if token_dim == 0 and x.dim() == 2:
        return x.unsqueeze(0)
    if token_dim == 1 and x.dim() == 3:
        return x
    raise ValueError(f"hidden states of shape {tuple(x.shape)} with token_dim={token_dim} are not supported "
                     "(expected (B, N, D) with token_dim=1 or (N, D) with token_dim=0)")


def _model_layout(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    return x.squeeze(0) if token_dim == 0 else x


def ipcv_prune(
    x_lp: torch.Tensor,
    x_prev: torch.Tensor,
    x0: torch.Tensor,
    pos_prev: Optional[torch.Tensor],
    metric: Optional[torch.Tensor] = None,
    log_size_prev: Optional[torch.Tensor] = None,
    *,
    token_dim: int,
    segment_lengths: Optional[Tuple[int, ...]],
    protected: int,
    grids: Optional[Tuple[Tuple[int, int], ...]],
    merge: int,
    config: dict,
    stage_retain: float,
    prev_retain: float,
):
    """One prune stage (:func:`ipcv_core.prune.prune_tokens`) at the input of its block.

    ``x0`` is the block stack's input (its token count is the original one); ``pos_prev`` the
    original positions of the current rows (None at the first stage); ``metric (B, L, C)`` the
    bipartite matching metric (:func:`ipcv_key_metric`), ``log_size_prev (B, L)`` the current rows'
    log sizes from the previous stage (merge variants).  The layout and config come
    as plain values (tuples / a dict), so the graph's generated code can print them.  Returns
    ``(x_keep [model layout], x_rem (B,R,D), keep_idx (B,K), rem_idx (B,R), nbr_idx (B,R,k),
    nbr_w (B,R,k), log_size (B,K), pos (B,K))`` — indices relative to the current rows, ``pos``
    the original positions of the kept rows; ``log_size`` zeros unless a merge variant is on.
    """
    layout = SegmentLayout(segment_lengths, protected, grids, merge)
    cfg = IPCVConfig(**config)  # (not from_dict: dynamo cannot trace dataclasses.fields)
    stage_cfg = IPCVConfig(**{**config, "retain": stage_retain, "stages": ()}) if cfg.stages else cfg
    xb, pb = _bnd(x_lp, token_dim), _bnd(x_prev, token_dim)
    n0 = x0.shape[token_dim]
    if pos_prev is None:
        if not is_tracing() and isinstance(xb.shape[1], int):
            layout.check_tokens(xb.shape[1])
        st = prune_tokens(xb, pb, layout, stage_cfg, metric=metric)
        pos = st.keep_idx
    else:
        cur = kept_layout(layout, plan_segments(layout, n0, prev_retain, cfg.min_keep))
        coords = None
        if cfg.reconstruction == "spatial":
            coords = gather_rows(layout_coords(layout, n0, xb.shape[0], xb.device), pos_prev)
        st = prune_tokens(
            xb, pb, cur, stage_cfg,
            keep_counts=stage_keep_counts(layout, n0, stage_retain, cfg.min_keep),
            positions=pos_prev, coords=coords, metric=metric,
            sizes=None if log_size_prev is None else torch.exp(log_size_prev),
        )
        pos = torch.gather(pos_prev, 1, st.keep_idx)
    log_size = st.log_size if st.log_size is not None else torch.zeros_like(st.keep_idx, dtype=torch.float32)
    return (_model_layout(st.h_keep_lp, token_dim), st.h_rem_lp, st.keep_idx, st.rem_idx, st.nbr_idx, st.nbr_w,
            log_size, pos)


def ipcv_key_metric(key: torch.Tensor) -> torch.Tensor:
    """The bipartite matching metric from an SDPA key input: ``(B, H, L, E)`` -> ``(B, L, E)``
    (mean over heads), or ``(H, L, E)`` -> ``(1, L, E)``."""
    if key.dim() == 4:
        return key.mean(1)
    if key.dim() == 3:
        return key.mean(0).unsqueeze(0)
    raise ValueError(f"attention keys of shape {tuple(key.shape)}: expected (B, H, L, E) or (H, L, E)")


def ipcv_attention_bias(mask: Optional[torch.Tensor], log_size: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """SDPA ``attn_mask`` adding ``log(size)`` of every key (proportional attention, ``(B, K)``) to
    an existing bool / float mask (or none)."""
    bias = log_size[:, None, None, :].to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask.to(dtype) + bias


def ipcv_reconstruct(x_keep_l: torch.Tensor, stages: Tuple[Tuple[torch.Tensor, ...], ...], *, token_dim: int) -> torch.Tensor:
    """NGR (eq. 5) for the removed rows at the current layer, then restore (eq. 7/10), through every
    prune stage (innermost first): the full sequence in original order, in the model's layout.
    ``stages``: per stage ``(x_keep_lp, x_rem_lp, keep_idx, rem_idx, nbr_idx, nbr_w)``."""
    x = _bnd(x_keep_l, token_dim)
    for x_keep_lp, x_rem_lp, keep_idx, rem_idx, nbr_idx, nbr_w in reversed(stages):
        rec = ngr(x_rem_lp, _bnd(x_keep_lp, token_dim), x, nbr_idx, nbr_w)
        x = restore(x, rec, keep_idx, rem_idx)
    return _model_layout(x, token_dim)


def ipcv_gather_tokens(t: torch.Tensor, keep_idx: torch.Tensor, *, dims: Tuple[int, ...], batch: str) -> torch.Tensor:
    """Keep the rows of ``keep_idx (B, K)`` along each token dim in ``dims`` of a per-token value.

    ``batch``: ``"full"`` — ``t``'s dim 0 is the batch (size B), each row uses its own keep list;
    ``"broadcast"`` — dim 0 has size 1 and broadcasts over the batch (expanded to B first);
    ``"none"`` — ``t`` has no batch dim, and the batch must have one row (checked eagerly).
    """
    if batch not in ("full", "broadcast", "none"):
        raise ValueError(f"batch must be 'full', 'broadcast' or 'none', got {batch!r}")
    if batch == "none":
        if not is_tracing() and keep_idx.shape[0] != 1:
            raise ValueError(
                f"a per-token side input of shape {tuple(t.shape)} has no batch dimension, but the batch has "
                f"{keep_idx.shape[0]} rows with different keep sets; run one image per call or give the side "
                "input a batch dimension"
            )
        idx = keep_idx[0]
        for d in dims:
            t = t.index_select(d, idx)
        return t
    B, K = keep_idx.shape
    if batch == "broadcast":
        t = t.expand(B, *t.shape[1:])
    for d in dims:
        d = d % t.dim()
        view = [B] + [1] * (t.dim() - 1)
        view[d] = K
        size = list(t.shape)
        size[d] = K
        t = torch.gather(t, d, keep_idx.view(view).expand(size))
    return t
