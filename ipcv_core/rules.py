"""The variant rules, declared once: how tokens are selected, where NGR looks for neighbours, and
whether removed tokens are merged, and where a stage sits in its block.  :class:`~ipcv_core.IPCVConfig` validation, the prune step
(:mod:`ipcv_core.prune`), the eager driver, the cost model and the graph rewrite all ask these
rules what a configuration needs instead of comparing names.

A :class:`SelectionRule` scores the rows of a stage (higher = keep) and declares what it needs:
the patch grid (``needs_grid``), the block's attention keys (``needs_key_metric``: the driver calls
``Block.key_features``, the rewrite copies the key path before the stage), the most a stage may
remove (``max_removed_fraction``), whether it keeps one token per Z-order group of the grid
(``grouped``), the rule later stages use once the rows no longer form a grid (``later_stage``),
and whether it can run inside an exported graph (``exportable``).  New rules are registered with
:func:`register_selection` (e.g. a harness's data-dependent baseline).

A :class:`PlacementRule` says where in its block a stage sits (the block input, or between the
attention's residual add and the FFN).

ToMe is ``selection="bipartite"``, ``merge="average"``, ``placement="post_attention"``,
``reconstruction="copy"`` with a stage at every block; ToFu the same with ``merge="tofu"``.
DART(ViT) is ``selection="dart"``, ``reconstruction="copy"``, ``as_depth=0`` (the lmms-eval ``method=dart_vit``).
The paper's method is ``selection="score"``, ``reconstruction="feature"``, ``merge="none"``,
``placement="block_input"``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from .selection import dart_segment_scores, feature_difference_score
from .variants import bipartite_scores, hash_of

__all__ = [
    "ScoreInputs", "SelectionRule", "ReconstructionRule", "MergeRule", "PlacementRule",
    "register_selection", "selection_rule", "selection_names",
    "reconstruction_rule", "reconstruction_names", "merge_rule", "merge_names",
    "placement_rule", "placement_names",
]


class ScoreInputs(NamedTuple):
    """What a selection rule may read, for the ``L`` current rows of a stage."""

    h: torch.Tensor  # (B, L, D) rows entering the stage's block (H_l)
    h_prev: torch.Tensor  # (B, L, D) the same rows entering the previous block (H_(l-1))
    positions: torch.Tensor  # (B, L) original positions of the rows
    unit_metric: Optional[torch.Tensor]  # (B, L, C) unit-norm attention keys (rules with needs_key_metric)
    x0: torch.Tensor  # (B, N, D) the block stack's input (original rows)
    plan: object  # the stage's SegmentPlan (segments of the current rows)
    seed: int
    # (B, L) position of each row within its original segment (image / frame); None = ``positions``.
    # Hashed selections read it, so an image keeps the same tokens wherever it sits in a packed row.
    segment_positions: Optional[torch.Tensor] = None
    # (B, L, C) the block's attention keys, head-averaged, not normalised (rules with needs_key_metric that
    # read the keys' magnitude: DART's pivots by key L1 norm)
    metric: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SelectionRule:
    name: str
    score: Callable[[ScoreInputs], torch.Tensor]  # -> (B, L) float, higher = keep
    needs_grid: bool = False
    needs_key_metric: bool = False
    max_removed_fraction: float = 1.0
    grouped: bool = False  # one kept token per Z-order group of the patch grid (first stage)
    later_stage: Optional[str] = None  # rule for stages after the first (None = this one)
    exportable: bool = True
    description: str = ""

    def at_stage(self, stage: int) -> "SelectionRule":
        """The rule a stage uses: later stages' rows no longer form a grid."""
        return selection_rule(self.later_stage) if stage > 0 and self.later_stage else self


@dataclass(frozen=True)
class ReconstructionRule:
    name: str
    needs_grid: bool  # neighbours by distance on the patch grid (needs SegmentLayout.grids)
    description: str = ""
    # a removed row is restored as a copy of its first neighbour's value (ToMe's unmerge) instead of
    # its own value at the stage plus the neighbours' later change (NGR)
    copies_neighbour: bool = False


@dataclass(frozen=True)
class MergeRule:
    name: str
    tracks_sizes: bool  # removed rows are absorbed by their first neighbour; sizes accumulate
    averages: bool  # the absorbing row's value becomes the size-weighted mean
    description: str = ""
    proportional: bool = True  # with tracks_sizes: attention adds log(size) of every key (ToMe's proportional attention)
    norm_preserving: bool = False  # with averages: MLERP (ToFu) — the mean's direction, the group's largest norm
    # (layer, final_layer) -> True where the stage at ``layer`` of a schedule ending at ``final_layer`` drops its
    # removed rows (no size or value absorbed: ToFu prunes early) instead of merging them
    drops: Callable[[int, int], bool] = lambda layer, final_layer: False

    def drops_at(self, layer: int, final_layer: int) -> bool:
        return bool(self.drops(layer, final_layer))

    @property
    def attention_bias(self) -> bool:
        """Attention after a stage adds ``log(size)`` of every key to the logits."""
        return self.tracks_sizes and self.proportional


@dataclass(frozen=True)
class PlacementRule:
    """Where in its block a prune stage sits.

    ``after_attention``: between the attention's residual add and the FFN (ToMe's placement) — the
    block's attention runs on the incoming rows, the stage scores the rows ``h = x + A(x)`` (the
    previous rows for eq. 1 are the block input ``x``), key-metric selections use the keys that
    attention itself computed (no second key projection), and the FFN runs on the kept rows.
    ``first_layer``: the lowest block a stage may sit at; ``allows_as``: attention stabilisation
    (AS, ``as_depth > 0``) is defined for this placement."""

    name: str
    after_attention: bool
    first_layer: int
    allows_as: bool
    description: str = ""


def _eq1(s: ScoreInputs) -> torch.Tensor:
    return feature_difference_score(s.h, s.h_prev)


def _hashed(s: ScoreInputs) -> torch.Tensor:
    return hash_of(s.positions if s.segment_positions is None else s.segment_positions, s.seed)


def _bipartite(s: ScoreInputs) -> torch.Tensor:
    if s.unit_metric is None:
        raise ValueError("selection='bipartite' needs the matching metric (the block's attention keys)")
    return bipartite_scores(s.unit_metric, s.plan)


def _dart(s: ScoreInputs) -> torch.Tensor:
    if s.metric is None:
        raise ValueError("selection='dart' needs the block's attention keys (its pivots are the keys of largest L1 norm)")
    return dart_segment_scores(s.h, s.metric, s.plan)


_lock = threading.Lock()
_SELECTIONS: Dict[str, SelectionRule] = {}
_RECONSTRUCTIONS: Dict[str, ReconstructionRule] = {}
_MERGES: Dict[str, MergeRule] = {}
_PLACEMENTS: Dict[str, PlacementRule] = {}


def register_selection(rule: SelectionRule) -> SelectionRule:
    """Make ``rule`` available as ``IPCVConfig(selection=rule.name)`` (replaces a rule of that name)."""
    if not isinstance(rule, SelectionRule):
        raise TypeError(f"register_selection expects a SelectionRule, got {type(rule).__name__}")
    if not 0.0 < rule.max_removed_fraction <= 1.0:
        raise ValueError(f"SelectionRule.max_removed_fraction must be in (0, 1], got {rule.max_removed_fraction}")
    with _lock:
        _SELECTIONS[rule.name] = rule
    return rule


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ValueError(f"IPCVConfig.{kind} must be one of {tuple(table)}, got {name!r}") from None


def selection_rule(name: str) -> SelectionRule:
    return _lookup(_SELECTIONS, "selection", name)


def selection_names() -> Tuple[str, ...]:
    return tuple(_SELECTIONS)


def reconstruction_rule(name: str) -> ReconstructionRule:
    return _lookup(_RECONSTRUCTIONS, "reconstruction", name)


def reconstruction_names() -> Tuple[str, ...]:
    return tuple(_RECONSTRUCTIONS)


def merge_rule(name: str) -> MergeRule:
    return _lookup(_MERGES, "merge", name)


def merge_names() -> Tuple[str, ...]:
    return tuple(_MERGES)


def placement_rule(name: str) -> PlacementRule:
    return _lookup(_PLACEMENTS, "placement", name)


def placement_names() -> Tuple[str, ...]:
    return tuple(_PLACEMENTS)


for _r in (
    SelectionRule("score", _eq1, description="eq. 1 top-K: the update of the previous block (the paper)"),
    SelectionRule("random", _hashed, description="a seeded integer hash of the token's original position"),
    SelectionRule("stratified", _eq1, needs_grid=True, grouped=True, later_stage="score",
                  description="the best eq. 1 score of each spatially compact Z-order group"),
    SelectionRule("stratified_random", _hashed, needs_grid=True, grouped=True, later_stage="random",
                  description="one hashed token per Z-order group"),
    SelectionRule("bipartite", _bipartite, needs_key_metric=True, max_removed_fraction=0.5,
                  description="ToMe's bipartite soft matching on the block's attention keys"),
    SelectionRule("dart", _dart, needs_key_metric=True,
                  description="DART(ViT): pivots by the block's key L1 norm, then the tokens least cosine-similar to "
                              "them (ipcv_core.selection.dart_keep_mask); with reconstruction='copy', as_depth=0 the "
                              "lmms-eval method dart_vit"),
):
    register_selection(_r)
for _c in (
    ReconstructionRule("feature", False, "k nearest kept rows by feature distance at the stage (cosine of the "
                                         "keys for key-metric selections)"),
    ReconstructionRule("spatial", True, "k nearest kept rows on the patch grid"),
    ReconstructionRule("copy", False, "the value of the nearest kept row (by feature distance as 'feature'): "
                                      "ToMe's unmerge (with merge='average', the merged group's value)",
                       copies_neighbour=True),
):
    _RECONSTRUCTIONS[_c.name] = _c
for _m in (
    MergeRule("none", False, False, "removed rows are only reconstructed (the paper)"),
    MergeRule("size_bias", True, False, "proportional attention: log(size) of each kept row added to the logits"),
    MergeRule("average", True, True, "size_bias + the kept row's value becomes the size-weighted mean"),
    MergeRule("average_plain", True, True, "the size-weighted mean without proportional attention (an ablation)",
              proportional=False),
    MergeRule("tofu", True, True, "ToFu: stages in the first third of the blocks up to the final stage (layer < "
              "(prune_layer + 1) // 3) drop the removed rows, later ones merge with MLERP (the size-weighted mean's "
              "direction, the group's largest norm); proportional attention",
              norm_preserving=True, drops=lambda layer, final_layer: layer < (final_layer + 1) // 3),
):
    _MERGES[_m.name] = _m
for _p in (
    PlacementRule("block_input", False, 1, True, "at the input of the stage's block (the paper)"),
    PlacementRule("post_attention", True, 0, False,
                  "between the attention residual add and the FFN, on the block's own attention keys (ToMe)"),
):
    _PLACEMENTS[_p.name] = _p
