"""IPCV configuration, its validation, and the retain-ratio -> token-count rule.

Conventions (see README "Method conventions"):

* Blocks are numbered from 0.  ``H_l`` is the *input* of block ``l`` (``H_0`` = the patch embeddings).
* ``prune_layer`` (l_p) is the block at whose input tokens are scored and removed.  The score is the
  update made by block ``l_p - 1``: ``s_i = ||H_lp[i] - H_(lp-1)[i]||_2``.  With ``l_p = 1`` this is the
  update of block 0 (the authors' code needs ``l_p >= 2``; ``1`` is the natural extension).
* Attention stabilisation (AS) covers blocks ``[l_p, l_p + as_depth)``.
* ``K = ceil(r * n)`` prunable tokens are kept per segment, computed exactly with ``r`` read as the
  fraction ``Fraction(r).limit_denominator(10**6)`` (so ``0.7 * 10`` keeps 7, not 8), then raised to
  ``min_keep`` and to at least 1, and capped at ``n``.  Protected tokens (e.g. CLS) are kept on top.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from .counts import _is_int, num_keep, retain_fraction  # noqa: F401  (the K rule, re-exported)

__all__ = ["IPCVConfig", "PAPER_DEFAULTS", "num_keep", "retain_fraction", "gradual_stages"]

WEIGHTINGS = ("mean", "similarity")
#: the paper's defaults for Qwen2-VL (its main model); fields left ``None`` take a tower's defaults
PAPER_DEFAULTS = {"prune_layer": 3, "as_depth": 7}


def _fraction_words(f: float) -> str:
    return {0.5: "half", 0.25: "a quarter"}.get(f, f"{f:g}")


@dataclass(frozen=True)
class IPCVConfig:
    """Parameters of IPCV.

    ``prune_layer`` and ``as_depth`` default to ``None``: "the tower's default", filled in by
    :meth:`resolve` — a tower's adapter supplies its defaults (the paper's ``l_p=3, Δ=7`` for the Qwen
    family, ``l_p=7, Δ=3`` for InternVL, ...; :data:`PAPER_DEFAULTS` without an adapter),
    clipped to the depth (``l_p <= depth-1``, ``Δ <= depth - l_p``, as the authors' code clips Δ).
    A value given explicitly is never clipped: one that does not fit the depth raises, naming it.

    Attributes:
        retain: fraction ``r`` of prunable tokens kept per segment, ``0 < r <= 1``.
        prune_layer: ``l_p >= 1``; must be ``< depth`` of the model.
        as_depth: ``Δ >= 0``, number of AS blocks starting at ``l_p``; ``l_p + Δ <= depth``.
        k: neighbours per removed token for NGR, ``k >= 1``.  A segment keeping fewer than ``k``
            tokens uses all it keeps.
        weighting: ``"mean"`` (the paper: 1/k each) or ``"similarity"`` (softmax of the cosine
            similarity at ``l_p`` divided by ``similarity_temperature``; weights sum to 1).
        similarity_temperature: temperature of ``"similarity"`` weighting, ``> 0``.
        min_keep: minimum number of prunable tokens kept per segment, ``>= 1``.
        reintegrate: restore removed tokens after the last block (the paper: True).  False returns
            only the kept rows (an ablation; the output is then shorter than the input).

    Variants beyond the paper (defaults = the paper's method, the *reference mode*):
        selection: ``"score"`` (eq. 1 top-K, the paper); ``"random"`` (a seeded hash of the token
            index, same for every image); ``"stratified"`` (the segment's patch grid is cut into K
            spatially compact groups along a Z-order curve and the best eq. 1 score of each group is
            kept: uniform coverage, informed within cells); ``"stratified_random"`` (one hashed
            random token per group).  Stratified variants need the patch grid (SegmentLayout.grids);
            ``"bipartite"`` (ToMe's bipartite soft matching as a keep score: the segment's rows
            alternate between sets A and B, the A rows most cosine-similar to some B row are removed;
            the metric is the block's attention keys averaged over heads, computed on the rows
            entering the block — the graph rewrite copies the key path, the eager driver calls
            ``Block.key_features``).  A bipartite stage never removes more than half of its rows:
            each stage's retain must be at least half of the previous one's.  Combined with
            ``reconstruction="feature"``, neighbours are searched by cosine of the same metric.
        reconstruction: neighbours for NGR by ``"feature"`` distance at l_p (the paper) or by
            ``"spatial"`` distance on the patch grid (needs SegmentLayout.grids).
        merge: ``"none"`` (the paper); ``"size_bias"`` — each removed token is absorbed by its first
            neighbour, and after the AS range attention adds ``log(size)`` of every kept token to
            the logits (ToMe's proportional attention, through SDPA's float mask); ``"average"`` —
            additionally the kept token's value at l_p becomes the size-weighted mean of itself and
            the tokens it absorbed (ToMe's merge); ``"average_plain"`` — the merge without
            proportional attention (an ablation); ``"tofu"`` — ToFu: stages in the first third of the
            blocks up to the final one (``layer < (prune_layer + 1) // 3``) drop their removed tokens
            (nothing absorbed), later ones merge with MLERP (the size-weighted mean's direction rescaled
            to the largest norm of the group), with proportional attention.
        seed: seed of ``"random"`` selections.
        stages: earlier prune stages ``((layer, retain), ...)`` before the final one at
            ``prune_layer`` with ``retain`` — pruning spread over several blocks (layers strictly
            increasing and below ``prune_layer``, retains strictly decreasing and above ``retain``;
            every ratio is relative to the original token count).  Removed tokens of every stage
            are NGR-reconstructed at the end (innermost stage first); AS follows the final stage.
            Later stages select with the eq. 1 score (``"stratified"``) or the hash
            (``"stratified_random"``): their rows no longer form a grid.  With a merge variant sizes
            accumulate over stages (a kept row absorbing an earlier-merged row adds its size) and
            proportional attention applies in every non-AS block after the first stage — with
            ``selection="bipartite"``, ``merge="average"`` and a stage at every block this is ToMe's
            gradual merging, with IPCV's NGR (own value at the merge + the neighbour's later delta)
            in place of ToMe's copy-unmerge (see :func:`gradual_stages`).
        placement: where every stage sits in its block: ``"block_input"`` (the paper) or
            ``"post_attention"`` — between the attention's residual add and the FFN, as ToMe merges:
            the block's attention runs on the incoming rows, the stage scores ``h = x + A(x)`` (eq. 1
            then reads the attention's update ``h - x``), key-metric selections use the keys that
            attention computed (the graph rewrite adds no key projection), and the block's FFN
            already runs on the kept rows.  Stages may then sit at block 0 (``prune_layer``, stage
            layers ``>= 0``); AS is not defined for it (``as_depth`` must be 0; left ``None`` it
            resolves to 0).
        reconstruction ``"copy"``: a removed row is restored as the final value of its nearest kept
            row (ToMe's unmerge; with ``merge="average"`` the merged group's value) instead of NGR.
    """

    retain: float = 0.35
    prune_layer: Optional[int] = None
    as_depth: Optional[int] = None
    k: int = 10
    weighting: str = "mean"
    similarity_temperature: float = 0.1
    min_keep: int = 1
    reintegrate: bool = True
    selection: str = "score"
    reconstruction: str = "feature"
    merge: str = "none"
    seed: int = 0
    stages: Tuple[Tuple[int, float], ...] = ()
    placement: str = "block_input"
    # Free-form, validated by the component that reads it (variants added beyond the paper).
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.retain
        if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(float(r)) or not (0.0 < float(r) <= 1.0):
            raise ValueError(f"IPCVConfig.retain must be a number in (0, 1], got {r!r}")
        from . import rules  # the variant rules (validation names the allowed values)

        place = rules.placement_rule(self.placement)
        lo = place.first_layer
        if self.prune_layer is not None and (not _is_int(self.prune_layer) or self.prune_layer < lo):
            raise ValueError(f"IPCVConfig.prune_layer must be an int >= {lo} (or None: the tower's default), "
                             f"got {self.prune_layer!r}")
        if self.as_depth is not None and (not _is_int(self.as_depth) or self.as_depth < 0):
            raise ValueError(f"IPCVConfig.as_depth must be an int >= 0 (or None: the tower's default), got {self.as_depth!r}")
        if not place.allows_as and self.as_depth not in (None, 0):
            raise ValueError(f"IPCVConfig.as_depth must be 0 with placement={self.placement!r} (attention "
                             f"stabilisation is defined for stages at the block input), got {self.as_depth}")
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"IPCVConfig.k must be an int >= 1, got {self.k!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"IPCVConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        t = self.similarity_temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (float(t) > 0.0) or math.isinf(float(t)):
            raise ValueError(f"IPCVConfig.similarity_temperature must be a finite number > 0, got {t!r}")
        if not _is_int(self.min_keep) or self.min_keep < 1:
            raise ValueError(f"IPCVConfig.min_keep must be an int >= 1, got {self.min_keep!r}")
        rules.selection_rule(self.selection)
        rules.reconstruction_rule(self.reconstruction)
        rules.merge_rule(self.merge)
        stages = tuple((int(sl), float(sr)) for sl, sr in self.stages)
        object.__setattr__(self, "stages", stages)
        prev_l, prev_r = lo - 1, 1.0 + 1e-12
        for sl, sr in stages:
            if self.prune_layer is None:
                raise ValueError("IPCVConfig.stages need an explicit prune_layer (the final stage's block)")
            if not (prev_l < sl < self.prune_layer):
                raise ValueError(
                    f"IPCVConfig.stages layers must increase strictly within [{lo}, prune_layer-1] = "
                    f"[{lo}, {self.prune_layer - 1}], got {list(stages)}"
                )
            if not (float(r) < sr < prev_r):
                raise ValueError(
                    f"IPCVConfig.stages retains must decrease strictly within (retain, 1] = ({self.retain}, 1], "
                    f"got {list(stages)}"
                )
            prev_l, prev_r = sl, sr
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"IPCVConfig.seed must be an int >= 0, got {self.seed!r}")
        if not isinstance(self.reintegrate, bool):
            raise ValueError(f"IPCVConfig.reintegrate must be a bool, got {self.reintegrate!r}")
        object.__setattr__(self, "retain", float(r))
        object.__setattr__(self, "extras", dict(self.extras))

    @classmethod
    def paper(cls, retain: float = 0.35) -> "IPCVConfig":
        """The paper's method with its published Qwen2-VL defaults (``l_p=3, Δ=7, k=10``, eq. 1
        selection, mean NGR, no variant) at ``retain``: the reference of ``ipcv tune`` and of the
        benchmarks."""
        return cls(retain=retain, k=10, **PAPER_DEFAULTS)

    # ------------------------------------------------------------------ model-dependent validation
    @property
    def is_resolved(self) -> bool:
        return None not in (self.prune_layer, self.as_depth)

    def resolve(self, depth: int, defaults: Optional[Mapping[str, int]] = None) -> "IPCVConfig":
        """This config for a tower of ``depth`` blocks: fields left ``None`` take ``defaults``
        (a tower's; default :data:`PAPER_DEFAULTS`) clipped to the depth (``l_p <= depth-1``,
        ``Δ <= depth - l_p``); explicit fields stay and are validated (:meth:`validate_depth`)."""
        if not _is_int(depth) or depth < 2:
            raise ValueError(f"model depth must be an int >= 2 for IPCV, got {depth!r}")
        d = {**PAPER_DEFAULTS, **(defaults or {})}
        place = self.placement_rule
        lp = self.prune_layer if self.prune_layer is not None else \
            max(place.first_layer, min(d["prune_layer"], depth - 1))
        delta = self.as_depth if self.as_depth is not None else \
            (max(0, min(d["as_depth"], depth - lp)) if place.allows_as else 0)
        cfg = self if (lp, delta) == (self.prune_layer, self.as_depth) else \
            dataclasses.replace(self, prune_layer=lp, as_depth=delta)
        cfg.validate_depth(depth)
        return cfg

    def _require_resolved(self) -> None:
        if not self.is_resolved:
            raise ValueError("this IPCVConfig leaves prune_layer / as_depth to the tower's defaults: "
                             "call config.resolve(depth) (rewrite() and run_ipcv() do)")

    def validate_depth(self, depth: int) -> None:
        """Check the layer indices against a model with ``depth`` blocks (fields left ``None`` as
        :meth:`resolve` would fill them), and that no stage removes more of its rows than the
        selection rule allows (e.g. half for bipartite; raises ValueError)."""
        if not _is_int(depth) or depth < 2:
            raise ValueError(f"model depth must be an int >= 2 for IPCV, got {depth!r}")
        if not self.is_resolved:
            self.resolve(depth)
            return
        if self.prune_layer >= depth:
            raise ValueError(
                f"IPCVConfig.prune_layer must be in [1, depth-1] = [1, {depth - 1}] for this model "
                f"(depth {depth}), got {self.prune_layer}"
            )
        if self.prune_layer + self.as_depth > depth:
            raise ValueError(
                f"IPCVConfig.as_depth must be in [0, depth - prune_layer] = [0, {depth - self.prune_layer}] "
                f"for this model (depth {depth}, prune_layer {self.prune_layer}), got {self.as_depth}"
            )
        self._check_removed_fraction()

    def _check_removed_fraction(self) -> None:
        rule = self.selection_rule
        if rule.max_removed_fraction >= 1.0:
            return
        keep_at_least = 1.0 - rule.max_removed_fraction
        prev = 1.0
        for sr in [sr for _, sr in self.stages] + [self.retain]:
            if sr < keep_at_least * prev - 1e-12:
                raise ValueError(
                    f"IPCVConfig: a {self.selection} stage removes at most {_fraction_words(rule.max_removed_fraction)} "
                    f"of its rows, so "
                    f"each stage's retain (stages, then retain) must be >= {keep_at_least:g} x the previous one (first vs "
                    f"1.0); got stages {list(self.stages)} and retain {self.retain}"
                )
            prev = sr

    @property
    def selection_rule(self):
        from .rules import selection_rule

        return selection_rule(self.selection)

    @property
    def reconstruction_rule(self):
        from .rules import reconstruction_rule

        return reconstruction_rule(self.reconstruction)

    @property
    def merge_rule(self):
        from .rules import merge_rule

        return merge_rule(self.merge)

    @property
    def placement_rule(self):
        from .rules import placement_rule

        return placement_rule(self.placement)

    @property
    def post_attention(self) -> bool:
        """Stages sit between the attention residual add and the FFN (see ``placement``)."""
        return self.placement_rule.after_attention

    @property
    def schedule(self) -> Tuple[Tuple[int, float], ...]:
        """Every prune stage ``(layer, retain)``, the final one (``prune_layer``, ``retain``) last."""
        if self.prune_layer is None:
            self._require_resolved()
        return tuple(self.stages) + ((self.prune_layer, self.retain),)

    @property
    def is_reference(self) -> bool:
        """True when this is the paper's method as published (no variant beyond the paper)."""
        return (self.selection, self.reconstruction, self.merge, self.weighting, self.stages, self.placement) == (
            "score", "feature", "none", "mean", (), "block_input")

    @property
    def needs_grid(self) -> bool:
        """The patch grid is needed (grid-aware selection or spatial neighbours)."""
        return self.selection_rule.needs_grid or self.reconstruction_rule.needs_grid

    @property
    def needs_key_metric(self) -> bool:
        """Each stage needs its block's attention keys on the incoming rows."""
        return self.selection_rule.needs_key_metric

    @property
    def as_end(self) -> int:
        """First block after the AS range (``l_p + Δ``)."""
        self._require_resolved()
        return self.prune_layer + self.as_depth

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes: Any) -> "IPCVConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extras"] = dict(self.extras)
        d["stages"] = [list(s) for s in self.stages]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IPCVConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown IPCVConfig field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**dict(d))

    def to_json(self, path: str | None = None) -> str:
        s = json.dumps({"ipcv_config": self.to_dict()}, indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(s + "\n")
        return s

    @classmethod
    def from_json(cls, path_or_text: str) -> "IPCVConfig":
        text = path_or_text
        if not path_or_text.lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        d = json.loads(text)
        return cls.from_dict(d.get("ipcv_config", d))


def gradual_stages(retain: float, first: int, last: int, front: float = 1.0,
                   every: int = 1) -> Tuple[Tuple[int, float], ...]:
    """Stages ``((layer, retain), ...)`` at blocks ``first, first+every, ...`` below ``last`` that,
    with the final stage ``(prune_layer=last, retain)``, remove tokens gradually: after ``j`` of the
    ``S`` stages the fraction removed is ``(1 - retain) * (j/S) ** front`` (``front = 1``: the same
    number per stage, as ToMe's schedule; ``front < 1`` removes more early, cheaper; ``> 1``
    later).  ``every = 1``: a stage at every block ``first .. last`` (``S = last-first+1``); larger:
    fewer, bigger stages (less per-stage work).  Ratios are rounded to 1e-4 (the JSON stays
    readable); every one stays strictly between its neighbours.  Returns ``()`` when ``first == last``."""
    if not (_is_int(first) and _is_int(last) and 0 <= first <= last):
        raise ValueError(f"gradual_stages needs ints 0 <= first <= last, got first={first!r}, last={last!r}")
    if not (isinstance(front, (int, float)) and front > 0):
        raise ValueError(f"gradual_stages front must be a number > 0, got {front!r}")
    if not (_is_int(every) and every >= 1):
        raise ValueError(f"gradual_stages every must be an int >= 1, got {every!r}")
    layers = list(range(first, last, every))
    S = len(layers) + 1
    out = []
    prev = 1.0
    for j, layer in enumerate(layers, start=1):
        sr = round(1.0 - (1.0 - retain) * (j / S) ** front, 4)
        sr = min(max(sr, retain + 1e-4), prev - 1e-4)
        out.append((layer, sr))
        prev = sr
    return tuple(out)
