"""The search behind ``ipcv tune``: coordinate descent over IPCV configurations under a cost budget.

Model-free: the caller supplies ``evaluate(config) -> fidelity`` and ``cost(config) -> cost
relative to the reference`` (the paper's IPCV at the same retain ratio, :meth:`IPCVConfig.paper`).
Two families, each by coordinate descent: (1) from the paper's configuration over selection x
reconstruction (+ weighting) x k x (l_p, Δ) x merge; (2) gradual bipartite merging (ToMe-style, a
prune stage at every block, with IPCV's NGR at reintegration) over the first merging block x how
front-loaded the schedule is x k x merge.  Each candidate is first checked against the budget
(cheap), then scored; the best of both families wins.  Towers are tuned by
:func:`ipcv_adapters.tune.tune_tower`, which supplies both callables.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from .config import IPCVConfig, gradual_stages

__all__ = ["Candidate", "TuneResult", "tune", "merge_family_config", "short_description", "MERGE_SPACE"]


@dataclass
class Candidate:
    config: IPCVConfig
    fidelity: float = float("nan")
    cost: float = float("nan")  # relative to the reference (paper IPCV) = 1.0
    feasible: bool = True


@dataclass
class TuneResult:
    best: IPCVConfig
    reference: IPCVConfig
    table: List[Candidate] = field(default_factory=list)
    seconds: float = 0.0

    def format_table(self, top: int = 15) -> str:
        rows = sorted(self.table, key=lambda c: (not c.feasible, -c.fidelity))[:top]
        out = [f"{'fidelity':>8} | {'cost':>5} | ok | config"]
        for c in rows:
            out.append(f"{c.fidelity:8.4f} | {c.cost:5.2f} | {'y' if c.feasible else 'n':>2} | {short_description(c.config)}")
        return "\n".join(out)


def short_description(cfg: IPCVConfig) -> str:
    """One line naming the fields a tuned config differs in."""
    s = (f"sel={cfg.selection} rec={cfg.reconstruction}/{cfg.weighting} k={cfg.k} "
         f"l_p={cfg.prune_layer} Δ={cfg.as_depth} merge={cfg.merge}")
    if cfg.stages:
        s += f" stages={cfg.stages[0][0]}..{cfg.stages[-1][0]}({len(cfg.stages)})"
        fr = cfg.extras.get("front")
        if fr is not None:
            s += f" front={fr}"
    return s


MERGE_SPACE = {"first": [1, 2], "front": [0.8, 0.9, 1.0, 1.2], "k": [1, 3], "merge": ["average", "size_bias"]}


def merge_family_config(retain: float, depth: int, first: int = 1, front: float = 1.0, k: int = 1,
                        merge: str = "average") -> IPCVConfig:
    """A config of the gradual-merging family: bipartite selection at every block from ``first``
    to ``depth - 1`` (:func:`ipcv_core.gradual_stages` with ``front``), merge, no AS, NGR with
    ``k`` cosine-nearest kept rows at reintegration.  ``extras["front"]`` records ``front``."""
    last = depth - 1
    return IPCVConfig(retain=retain, prune_layer=last, as_depth=0, k=k, selection="bipartite", merge=merge,
                      reconstruction="feature", weighting="mean", stages=gradual_stages(retain, first, last, front),
                      extras={"front": front})


def _space(depth: int) -> Dict[str, List]:
    lps = sorted({max(1, min(depth - 1, x)) for x in (2, 3, 4, 5, 6)})
    return {
        "recon": [("feature", "mean"), ("feature", "similarity"), ("spatial", "similarity")],
        "selection": ["score", "random", "stratified"],
        "k": [3, 6, 10],
        "depths": [(lp, d) for lp in lps for d in (0, 1, 2, 4, 7) if lp + d <= depth],
        "merge": ["none", "size_bias"],
    }


def tune(
    evaluate: Callable[[Optional[IPCVConfig]], float],
    cost: Callable[[IPCVConfig], float],
    retain: float,
    depth: int,
    has_grid: bool = True,
    passes: int = 2,
    tolerance: float = 0.0,
    progress: Optional[Callable[[str], None]] = None,
    confirm: Optional[Callable[[IPCVConfig], float]] = None,
    confirm_top: int = 4,
    families: Sequence[str] = ("prune", "merge"),
) -> TuneResult:
    """Coordinate-descent search.

    Args:
        evaluate: config -> fidelity (higher is better) on the user's images (or a screening
            subset of them).
        cost: config -> cost relative to the reference (the paper's IPCV at ``retain``) = 1.0.
        has_grid: whether the patch grid is known (spatial / stratified variants need it).
        tolerance: allowed relative excess over the reference cost.
        confirm: optional config -> fidelity on all images; the ``confirm_top`` best screened
            candidates (and the reference) are re-scored with it and the best of those is chosen.
        families: ``"prune"`` — the paper's one-shot pruning and its variants (coordinate descent
            from the paper's config over selection x reconstruction x k x (l_p, Δ) x merge);
            ``"merge"`` — gradual bipartite merging (:func:`merge_family_config`; descent from
            ``first=1, front=1, k=1, average`` over :data:`MERGE_SPACE`).  The best of both wins.
    """
    for f in families:
        if f not in ("prune", "merge"):
            raise ValueError(f"families must be a subset of ('prune', 'merge'), got {tuple(families)!r}")
    t0 = time.perf_counter()
    reference = IPCVConfig.paper(retain)
    reference.validate_depth(depth)
    space = _space(depth)
    if not has_grid:
        space["recon"] = [r for r in space["recon"] if r[0] != "spatial"]
        space["selection"] = [s for s in space["selection"] if not s.startswith("stratified")]
    seen: Dict[str, Candidate] = {}

    def run(cfg: IPCVConfig) -> Candidate:
        key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "extras"}, sort_keys=True)
        if key in seen:
            return seen[key]
        c = Candidate(cfg)
        c.cost = cost(cfg)
        c.feasible = c.cost <= 1.0 + tolerance
        if c.feasible:
            c.fidelity = evaluate(cfg)
            if progress:
                progress(f"{c.fidelity:.4f}  cost {c.cost:.2f}  {short_description(cfg)}")
        seen[key] = c
        return c

    def descend(point: Dict[str, Any], fid: float, space_: Dict[str, List], make, skip_invalid: bool):
        """Coordinate descent from ``point`` (fidelity ``fid``): each dimension's values in turn, the
        current point moves to any feasible candidate that improves; ``passes`` passes or until a
        pass changes nothing.  ``skip_invalid``: candidates whose config raises ValueError are
        skipped (merge schedules a stage of which would remove more than half of its rows)."""
        for _ in range(passes):
            improved = False
            for name, values in space_.items():
                for v in values:
                    trial = {**point, name: v}
                    try:
                        c = run(make(trial))
                    except ValueError:
                        if not skip_invalid:
                            raise
                        continue
                    if c.feasible and c.fidelity > fid + 1e-6:
                        fid, point, improved = c.fidelity, trial, True
            if not improved:
                break
        return point, fid

    def make_prune(p):
        return reference.replace(selection=p["selection"], reconstruction=p["recon"][0], weighting=p["recon"][1],
                                 k=p["k"], prune_layer=p["depths"][0], as_depth=p["depths"][1], merge=p["merge"])

    ref_c = run(reference)
    # a reference measured over budget (latency noise) has no fidelity: start below every candidate
    best_fid = ref_c.fidelity if ref_c.feasible else float("-inf")
    cur = reference
    if "prune" in families:
        start = dict(selection=reference.selection, recon=(reference.reconstruction, reference.weighting),
                     k=reference.k, depths=(reference.prune_layer, reference.as_depth), merge=reference.merge)
        space1 = {d: space[d] for d in ("selection", "recon", "k", "depths", "merge")}
        point, best_fid = descend(start, best_fid, space1, make_prune, skip_invalid=False)
        cur = make_prune(point)
    if "merge" in families and depth >= 3:
        def make_merge(p):
            return merge_family_config(retain, depth, **p)

        point = dict(first=1, front=1.0, k=1, merge="average")
        try:
            c = run(make_merge(point))
        except ValueError:  # e.g. a stage would remove more than half of its rows
            c = None
        m_fid = c.fidelity if (c is not None and c.feasible) else float("-inf")
        space2 = {**MERGE_SPACE, "first": [v for v in MERGE_SPACE["first"] if v <= depth - 1]}
        point, m_fid = descend(point, m_fid, space2, make_merge, skip_invalid=True)
        if m_fid > best_fid:
            best_fid, cur = m_fid, make_merge(point)
    table = list(seen.values())
    if confirm is not None:
        feas = sorted((c for c in table if c.feasible), key=lambda c: -c.fidelity)[:confirm_top]
        ref_c = seen_ref = next(c for c in table if c.config == reference)
        for c in {id(x): x for x in feas + [ref_c]}.values():
            c.fidelity = confirm(c.config)
            if progress:
                progress(f"confirm {c.fidelity:.4f}  {short_description(c.config)}")
        cur = max(feas + [seen_ref], key=lambda c: c.fidelity).config
    return TuneResult(cur, reference, table, time.perf_counter() - t0)
