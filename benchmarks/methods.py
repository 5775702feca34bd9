"""Eager runners for IPCV's ablations and the baseline methods, over a list of :class:`Block` s.

Every runner has the signature ``run_X(h, blocks, retain, layout=None, **options) -> MethodOutput``
(like :func:`ipcv_core.run_ipcv`), works per image (batch rows are independent), never removes or
merges protected tokens (CLS, registers), runs attention through the blocks' own branches (SDPA in
the adapters) and returns a full-length output ``(B, N, D)`` in the original token order, so every
method feeds the same downstream consumer.  All methods end with the same number of tokens:
``K = num_keep(n, retain)`` prunable tokens (+ the protected ones), the count IPCV keeps.

Methods (``METHODS`` maps the names used by the benchmark to runners):

* ``vanilla`` — no compression.
* ``ipcv`` — IPCV as published (eq. 1 score at ``l_p``, AS for ``Δ`` blocks, NGR reintegration);
  options ``prune_layer`` (3), ``as_depth`` (7), ``k`` (10), ``weighting`` ("mean").
* ``ipcv_no_as`` — ``as_depth = 0``.
* ``ipcv_no_reint`` — no reintegration: the removed positions are filled with their own ``H_lp``
  value (the paper's ablation hands the LLM only the kept tokens; we keep the output length).
* ``ipcv_sim`` — similarity-weighted NGR (softmax of cosine / 0.1) instead of the mean.
* ``random_ipcv`` — a seeded random keep set per image (same ``K``) with NGR + AS.
* ``prune_copy`` / ``prune_lp`` — naive prune at ``l_p`` with IPCV's score, no AS; removed tokens
  restored by copying the final value of their Euclidean-nearest kept token at ``H_lp`` /
  by their own ``H_lp`` value (no update).
* ``dart`` — DART(ViT): duplication-aware keep set at ``l_p`` (see
  :mod:`benchmarks.baselines.selection`), later blocks on kept rows only; removed tokens restored by
  copying the final value of their most cosine-similar kept token at ``H_lp``.
* ``tome`` — ToMe: bipartite soft matching on the attention keys (head-averaged) in every block,
  between attention and FFN, size-weighted average merge, proportional attention (``log size``
  added to the logits through SDPA's float mask), matching on the keys the block's attention
  computed (``Block.attention_with_keys``: no second key projection); even schedule to the final count
  (:func:`benchmarks.baselines.even_schedule`); unmerged at the end.
* ``tofu`` — ToFu: the same matching and schedule; in the first ``prune_blocks`` blocks (default
  ``depth // 3``) the matched source tokens are *pruned* (dropped; ToFu prunes where the model
  responds non-linearly to interpolated inputs, i.e. early), later they are *merged* with MLERP
  (norm-preserving); proportional attention; unmerged at the end (a dropped token takes the value
  of the token it was matched to).

``MethodOutput.removed`` marks the positions whose output is not their own token's computation
(removed, or merged away into another token); ``keep_idx`` the others.  ``overhead_flops`` counts
per-image work done outside the block branches (matching, neighbour search, NGR), priced with
:mod:`ipcv_core.cost`'s functions; block branches (incl. ``key_features``) are counted by the caller
from shapes (:func:`benchmarks.cost.count_flops`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

from ipcv_core.config import IPCVConfig, num_keep
from ipcv_core.cost import ModelDims, knn_flops, matching_flops, ngr_flops
from ipcv_core.driver import AttnContext, Block, attend_with_keys, run_blocks, run_ipcv
from ipcv_core.reconstruct import restore
from ipcv_core.segments import SegmentLayout
from ipcv_core.selection import feature_difference_score, gather_rows, select_per_segment

from .baselines.merging import MergeTracker, bipartite_soft_matching
from .baselines.restore import copy_nearest, nearest_kept
from .baselines.schedule import even_schedule
from .baselines.selection import RANDOM_PER_IMAGE, dart_scores

__all__ = [
    "MethodOutput",
    "METHODS",
    "run_vanilla",
    "run_ipcv_method",
    "run_prune",
    "run_dart",
    "run_tome",
    "run_tofu",
    "get_method",
]


@dataclass
class MethodOutput:
    hidden_states: torch.Tensor  # (B, N, D), full length, original order
    removed: torch.Tensor  # (B, N) bool
    keep_idx: torch.Tensor  # (B, N - R) ascending positions not removed
    overhead_flops: float = 0.0  # per image, outside the block branches
    info: dict = field(default_factory=dict)


def _single_segment(layout: Optional[SegmentLayout], h: torch.Tensor, name: str) -> SegmentLayout:
    layout = layout or SegmentLayout()
    if layout.num_segments != 1:
        raise NotImplementedError(f"{name} supports one segment (image) per batch row; got {layout}")
    if h.dim() != 3:
        raise ValueError(f"hidden states must be (B, N, D), got shape {tuple(h.shape)}")
    layout.check_tokens(h.shape[1])
    return layout


def _mask_from(rem_idx: torch.Tensor, B: int, N: int) -> torch.Tensor:
    return torch.zeros(B, N, dtype=torch.bool, device=rem_idx.device).scatter(1, rem_idx, True)


def _keep_from_mask(removed: torch.Tensor) -> torch.Tensor:
    B = removed.shape[0]
    return torch.nonzero(~removed)[:, 1].view(B, -1)


# ----------------------------------------------------------------------------- vanilla
def run_vanilla(h, blocks: Sequence[Block], retain: float = 1.0, layout=None) -> MethodOutput:
    B, N, _ = h.shape
    out = run_blocks(h, blocks, layout)
    removed = torch.zeros(B, N, dtype=torch.bool, device=h.device)
    return MethodOutput(out, removed, torch.arange(N, device=h.device).expand(B, N))


# ----------------------------------------------------------------------------- IPCV and ablations
def _reconstruction_flops(R: int, K: int, k: int, dims: ModelDims, evaluations: int) -> float:
    """Neighbour search of the ``R`` removed rows among the ``K`` kept + ``evaluations`` NGR evaluations."""
    return knn_flops(R, K, dims) + ngr_flops(R, K, k, dims, evaluations=evaluations) if R else 0.0


def run_ipcv_method(
    h: torch.Tensor,
    blocks: Sequence[Block],
    retain: float,
    layout: Optional[SegmentLayout] = None,
    *,
    prune_layer: int = 3,
    as_depth: int = 7,
    k: int = 10,
    weighting: str = "mean",
    selection: str = "score",
    fill: str = "ngr",
    seed: int = 0,
) -> MethodOutput:
    """IPCV through :func:`ipcv_core.run_ipcv` with ablation switches.

    ``selection``: ``score`` (eq. 1) or ``random`` (the ``random_per_image`` rule: IPCV's hashed
    random score, seeded per image from the image's own input).
    ``fill``: ``ngr`` (reintegration) or ``lp`` (no reintegration: removed rows keep ``H_lp``).
    """
    if selection not in ("score", "random"):
        raise ValueError(f"selection must be 'score' or 'random', got {selection!r}")
    if fill not in ("ngr", "lp"):
        raise ValueError(f"fill must be 'ngr' or 'lp', got {fill!r}")
    layout = layout or SegmentLayout()
    B, N, D = h.shape
    cfg = IPCVConfig(retain=retain, prune_layer=prune_layer, as_depth=as_depth, k=k, weighting=weighting,
                     reintegrate=(fill == "ngr"), seed=seed,
                     selection=RANDOM_PER_IMAGE.name if selection == "random" else "score")
    res = run_ipcv(h, blocks, cfg, layout)
    if fill == "lp":  # the removed rows keep their value at l_p
        out = restore(res.hidden_states, res.stages[0].x_rem, res.keep_idx, res.rem_idx)
    else:
        out = res.hidden_states
    R, K = res.rem_idx.shape[1], res.keep_idx.shape[1] - layout.protected * layout.num_segments
    n_ngr = as_depth + (1 if fill == "ngr" else 0)
    flops = _reconstruction_flops(R, K, k, ModelDims(D), n_ngr)
    info = {"config": cfg.to_dict(), "selection": selection, "fill": fill}
    return MethodOutput(out, _mask_from(res.rem_idx, B, N), res.keep_idx, flops, info)


# ----------------------------------------------------------------------------- prune at l_p (naive, DART)
def _prune_at(h, blocks, retain, layout, prune_layer, scores_of, restore_with):
    """Blocks ``< l_p`` on all rows; keep the top-``K`` by ``scores_of(H_lp, H_(lp-1))`` per image;
    blocks ``>= l_p`` on kept rows only; ``restore_with(x_final_kept, h_lp, keep_idx, rem_idx)``
    builds the full-length output.  Returns (out, keep_idx, rem_idx)."""
    depth = len(blocks)
    if not 1 <= prune_layer < depth:
        raise ValueError(f"prune_layer must be in [1, {depth - 1}], got {prune_layer}")
    h_prev = h
    for blk in blocks[:prune_layer]:
        h_prev = h
        h = h + blk.attention_branch(h, h, AttnContext())
        h = h + blk.ffn_branch(h)
    keep_idx, rem_idx, _ = select_per_segment(scores_of(h, h_prev), layout, retain)
    x = gather_rows(h, keep_idx)
    ctx = AttnContext(q_pos=keep_idx, kv_pos=keep_idx)
    for blk in blocks[prune_layer:]:
        x = x + blk.attention_branch(x, x, ctx)
        x = x + blk.ffn_branch(x)
    return restore_with(x, h, keep_idx, rem_idx), keep_idx, rem_idx


def run_prune(
    h: torch.Tensor,
    blocks: Sequence[Block],
    retain: float,
    layout: Optional[SegmentLayout] = None,
    *,
    prune_layer: int = 3,
    restore_mode: str = "copy",
) -> MethodOutput:
    """Naive prune at ``l_p`` with IPCV's eq. (1) selection, no AS.  ``restore_mode``: ``copy``
    (final value of the Euclidean-nearest kept token at ``H_lp``) or ``lp`` (own ``H_lp`` value)."""
    layout = _single_segment(layout, h, "run_prune")
    if restore_mode not in ("copy", "lp"):
        raise ValueError(f"restore_mode must be 'copy' or 'lp', got {restore_mode!r}")
    P = layout.protected
    B, N, D = h.shape

    def restore_with(x, h_lp, keep_idx, rem_idx):
        if rem_idx.shape[1] == 0:
            return restore(x, x[:, :0], keep_idx, rem_idx)
        if restore_mode == "lp":
            return restore(x, gather_rows(h_lp, rem_idx), keep_idx, rem_idx)
        nbr = nearest_kept(gather_rows(h_lp, rem_idx), gather_rows(h_lp, keep_idx), P, "euclidean")
        return copy_nearest(x, nbr, keep_idx, rem_idx)

    out, keep_idx, rem_idx = _prune_at(h, blocks, retain, layout, prune_layer, feature_difference_score, restore_with)
    R, K = rem_idx.shape[1], keep_idx.shape[1] - P
    flops = knn_flops(R, K, ModelDims(D)) if restore_mode == "copy" else 0.0
    return MethodOutput(out, _mask_from(rem_idx, B, N), keep_idx, flops, {"restore": restore_mode})


def run_dart(
    h: torch.Tensor,
    blocks: Sequence[Block],
    retain: float,
    layout: Optional[SegmentLayout] = None,
    *,
    prune_layer: int = 3,
    num_pivots: int = 8,
) -> MethodOutput:
    """DART(ViT) at ``l_p``: pivots by key L1 norm, then the tokens least similar to the pivots;
    removed tokens copy the final value of their most cosine-similar kept token."""
    layout = _single_segment(layout, h, "run_dart")
    P = layout.protected
    B, N, D = h.shape
    keep = num_keep(N - P, retain)
    key_blk = blocks[prune_layer]

    def scores_of(h_lp, _h_prev):
        return dart_scores(h_lp, key_blk.key_features(h_lp), P, keep, num_pivots)

    def restore_with(x, h_lp, keep_idx, rem_idx):
        if rem_idx.shape[1] == 0:
            return restore(x, x[:, :0], keep_idx, rem_idx)
        nbr = nearest_kept(gather_rows(h_lp, rem_idx), gather_rows(h_lp, keep_idx), P, "cosine")
        return copy_nearest(x, nbr, keep_idx, rem_idx)

    out, keep_idx, rem_idx = _prune_at(h, blocks, retain, layout, prune_layer, scores_of, restore_with)
    R, n = rem_idx.shape[1], N - P
    dims = ModelDims(D)  # pivot-to-token similarities, then the removed tokens' nearest kept token
    flops = knn_flops(min(num_pivots, keep), n, dims) + knn_flops(R, keep, dims)
    return MethodOutput(out, _mask_from(rem_idx, B, N), keep_idx, flops, {"num_pivots": num_pivots})


# ----------------------------------------------------------------------------- ToMe / ToFu
def _run_merging(h, blocks, retain, layout, mode_of: Callable[[int], str], prop_attn: bool, name: str):
    layout = _single_segment(layout, h, name)
    P = layout.protected
    B, N, D = h.shape
    depth = len(blocks)
    schedule = even_schedule(N - P, num_keep(N - P, retain), depth)
    tracker = MergeTracker(B, N, h.device)
    x, flops = h, 0.0
    for li, blk in enumerate(blocks):
        r = schedule[li]
        ctx = AttnContext(bias=tracker.attention_bias(x.dtype) if prop_attn else None)
        if r:  # ToMe matches on the keys its attention computed (no second key projection)
            upd, metric = attend_with_keys(blk, x, ctx)
        else:
            upd, metric = blk.attention_branch(x, x, ctx), None
        x = x + upd
        if r:
            m = bipartite_soft_matching(metric, r, P)
            if m.r != r:
                raise RuntimeError(f"block {li}: schedule asks {r} merges, matching allows {m.r}")
            flops += knn_flops(m.n_a, m.n_b, ModelDims(metric.shape[-1]))  # A x B similarities
            x = tracker.step(x, m, mode_of(li))
        x = x + blk.ffn_branch(x)
    removed = tracker.removed_mask()
    info = {"schedule": schedule, "modes": [mode_of(i) for i in range(depth)], "sizes": tracker.size}
    return MethodOutput(tracker.unmerge(x), removed, _keep_from_mask(removed), flops, info)


def run_tome(h, blocks: Sequence[Block], retain: float, layout=None, *, prop_attn: bool = True) -> MethodOutput:
    """ToMe with proportional attention, even schedule to ``K`` tokens, unmerged to full length."""
    return _run_merging(h, blocks, retain, layout, lambda _l: "wavg", prop_attn, "run_tome")


def run_tofu(
    h, blocks: Sequence[Block], retain: float, layout=None, *, prune_blocks: Optional[int] = None, prop_attn: bool = True
) -> MethodOutput:
    """ToFu: prune (drop matched sources) in blocks ``< prune_blocks`` (default ``depth // 3``),
    MLERP merge after; proportional attention; unmerged to full length."""
    pb = len(blocks) // 3 if prune_blocks is None else prune_blocks
    return _run_merging(h, blocks, retain, layout, lambda l: "prune" if l < pb else "mlerp", prop_attn, "run_tofu")


# ----------------------------------------------------------------------------- any IPCVConfig (variants)
def run_ipcv_config(h, blocks: Sequence[Block], retain: float, layout=None, **fields) -> MethodOutput:
    """IPCV with any :class:`IPCVConfig` fields (the variants beyond the paper, a tuned config):
    ``IPCVConfig(retain=retain, **fields)`` through :func:`ipcv_core.run_ipcv`.  Grid-aware variants
    need the patch grid: when ``layout`` has none and every row is ``protected + s*s`` tokens, the
    grid is taken as ``s x s`` (square images, row-major patches)."""
    layout = layout or SegmentLayout()
    cfg = IPCVConfig(retain=retain, **fields).resolve(len(blocks))
    if cfg.needs_grid and layout.grids is None:
        n = h.shape[1] - layout.protected
        s = int(round(n ** 0.5))
        if layout.lengths is not None or s * s != n:
            raise ValueError("grid-aware IPCV variants need SegmentLayout.grids (non-square input)")
        layout = SegmentLayout.batched(layout.protected, (s, s))
    B, N, D = h.shape
    res = run_ipcv(h, blocks, cfg, layout)
    P = layout.protected * layout.num_segments
    flops = 0.0
    for i, (st, width) in enumerate(zip(res.stages, res.metric_dims)):
        # per stage, as ipcv_core.cost.config_flops: the neighbour search (on the metric the search
        # runs on), the reintegration's NGR (+ one per AS block after the final stage) and the
        # bipartite A x B similarities at the metric's width
        R, K = st.rem_idx.shape[1], st.keep_idx.shape[1] - P
        search = ModelDims(width) if width is not None and not cfg.reconstruction_rule.needs_grid else ModelDims(D)
        n_ngr = 1 + (cfg.as_depth if i == len(res.stages) - 1 else 0)
        flops += (knn_flops(R, K, search) + ngr_flops(R, K, cfg.k, ModelDims(D), evaluations=n_ngr)) if R else 0.0
        if width is not None:
            flops += matching_flops(st.keep_idx.shape[1] + st.rem_idx.shape[1], ModelDims(D, key_dim=width))
    return MethodOutput(res.hidden_states, _mask_from(res.rem_idx, B, N), res.keep_idx, flops,
                        {"config": cfg.to_dict()})


# ----------------------------------------------------------------------------- registry
METHODS: Dict[str, Callable[..., MethodOutput]] = {
    "vanilla": run_vanilla,
    "ipcv": run_ipcv_method,
    "ipcv_no_as": functools.partial(run_ipcv_method, as_depth=0),
    "ipcv_no_reint": functools.partial(run_ipcv_method, fill="lp"),
    "ipcv_sim": functools.partial(run_ipcv_method, weighting="similarity"),
    "random_ipcv": functools.partial(run_ipcv_method, selection="random"),
    "prune_copy": functools.partial(run_prune, restore_mode="copy"),
    "prune_lp": functools.partial(run_prune, restore_mode="lp"),
    "dart": run_dart,
    "tome": run_tome,
    "tofu": run_tofu,
    "ipcv_config": run_ipcv_config,
}


def get_method(name: str) -> Callable[..., MethodOutput]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}") from None
