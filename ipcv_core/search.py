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
from .schedule import Schedule

__all__ = ["Candidate", "TuneResult", "tune", "merge_family_config", "short_description", "MERGE_SPACE", "MERGE_START"]


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
    if cfg.placement != "block_input":
        s += f" at={cfg.placement}"
    if cfg.stages:
        s += f" stages={cfg.stages[0][0]}..{cfg.stages[-1][0]}({len(cfg.stages)})"
        for name in ("front", "every"):
            v = cfg.extras.get(name)
            if v is not None and not (name == "every" and v == 1):
                s += f" {name}={v}"
    return s


#: the merge family's search space (coordinate descent over these, from the first value of each
#: but ``front``, which starts at 1.0 — ToMe's even schedule)
MERGE_SPACE = {
    "placement": ["post_attention", "block_input"],
    "first": [0, 1, 2],
    "front": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5],
    "every": [1, 2, 3],
    "k": [1, 2, 3],
    "merge": ["average", "size_bias"],
}
MERGE_START = dict(placement="post_attention", first=0, front=1.0, every=1, k=1, merge="average")


def merge_family_config(retain: float, depth: int, first: int = 1, front: float = 1.0, k: int = 1,
                        merge: str = "average", placement: str = "block_input", every: int = 1,
                        reconstruction: str = "feature") -> IPCVConfig:
    """A config of the gradual-merging family: bipartite selection at blocks ``first,
    first+every, ...`` up to the final stage at ``depth - 1`` (:func:`ipcv_core.gradual_stages`
    with ``front``), merge, no AS, NGR with ``k`` cosine-nearest kept rows at reintegration
    (``reconstruction="copy"``: ToMe's unmerge).  ``placement="post_attention"``: each stage sits
    between its block's attention and FFN, on that attention's keys (ToMe's placement; ``first``
    may be 0).  ``extras`` records ``front`` and ``every``."""
    last = depth - 1
    return IPCVConfig(retain=retain, prune_layer=last, as_depth=0, k=k, selection="bipartite", merge=merge,
                      reconstruction=reconstruction, weighting="mean", placement=placement,
                      stages=gradual_stages(retain, first, last, front, every), extras={"front": front, "every": every})


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
    reference: Optional[IPCVConfig] = None,
    max_cost: float = 1.0,
) -> TuneResult:
    """Coordinate-descent search.

    Args:
        evaluate: config -> fidelity (higher is better) on the user's images (or a screening
            subset of them).
        cost: config -> cost relative to the reference (the paper's IPCV at ``retain``) = 1.0.
        has_grid: whether the patch grid is known (spatial / stratified variants need it).
        tolerance: allowed relative excess over the budget.
        max_cost: the budget, relative to the reference's cost (1.0: the paper's IPCV at ``retain``;
            e.g. 1.1 allows 10 % more FLOPs / time): a candidate is feasible when its cost is at most
            ``max_cost * (1 + tolerance)``.
        confirm: optional config -> fidelity on all images; the ``confirm_top`` best screened
            candidates (and the reference) are re-scored with it and the best of those is chosen.
        reference: the configuration the budget is relative to and the descent starts from (default:
            the paper's method, ``IPCVConfig(retain=retain)`` resolved for ``depth``).
        families: ``"prune"`` — the paper's one-shot pruning and its variants (coordinate descent
            from the paper's config over selection x reconstruction x k x (l_p, Δ) x merge);
            ``"merge"`` — gradual bipartite merging (:func:`merge_family_config`; descent from
            :data:`MERGE_START` over :data:`MERGE_SPACE`; at every point the schedule's ``front`` is
            fitted to the budget — the most back-loaded schedule that fits, since fidelity rises
            with ``front`` and so does cost — and then also descended).  The best of both wins.
    """
    for f in families:
        if f not in ("prune", "merge"):
            raise ValueError(f"families must be a subset of ('prune', 'merge'), got {tuple(families)!r}")
    t0 = time.perf_counter()
    reference = Schedule.build((reference or IPCVConfig(retain=retain)).replace(retain=retain), depth).config
    space = _space(depth)
    if not has_grid:
        space["recon"] = [r for r in space["recon"] if r[0] != "spatial"]
        space["selection"] = [s for s in space["selection"] if not s.startswith("stratified")]
    seen: Dict[str, Candidate] = {}
    costs: Dict[str, float] = {}

    def key_of(cfg: IPCVConfig) -> str:
        return json.dumps({k: v for k, v in cfg.to_dict().items() if k != "extras"}, sort_keys=True)

    def cost_of(cfg: IPCVConfig) -> float:
        """``cost(cfg)``, once per configuration (a latency budget times it)."""
        key = key_of(cfg)
        if key not in costs:
            costs[key] = cost(cfg)
        return costs[key]

    def run(cfg: IPCVConfig) -> Candidate:
        key = key_of(cfg)
        if key in seen:
            return seen[key]
        c = Candidate(cfg)
        c.cost = cost_of(cfg)
        c.feasible = c.cost <= max_cost * (1.0 + tolerance)
        if c.feasible:
            c.fidelity = evaluate(cfg)
            if progress:
                progress(f"{c.fidelity:.4f}  cost {c.cost:.2f}  {short_description(cfg)}")
        seen[key] = c
        return c

    def descend(point: Dict[str, Any], fid: float, space_: Dict[str, List], make, skip_invalid: bool,
                point_of: Optional[Callable[[IPCVConfig], Dict[str, Any]]] = None):
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
                        fid, point, improved = c.fidelity, (point_of(c.config) if point_of else trial), True
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

        def fits(cfg: IPCVConfig) -> bool:
            return cost_of(cfg) <= max_cost * (1.0 + tolerance)

        fronts = sorted(MERGE_SPACE["front"])

        def make_fitted(p):
            """``p`` with the most back-loaded front that fits the budget (cost rises with the front:
            a bisection over the valid fronts, so a measured budget times few of them)."""
            valid = []
            for fr in fronts:
                try:
                    valid.append(make_merge({**p, "front": fr}))
                except ValueError:
                    continue
            lo, hi = 0, len(valid) - 1  # the answer is the last index that fits, if any
            best = None
            while lo <= hi:
                mid = (lo + hi) // 2
                if fits(valid[mid]):
                    best, lo = valid[mid], mid + 1
                else:
                    hi = mid - 1
            return best if best is not None else make_merge(p)  # nothing fits: the (infeasible) point itself

        def merge_point(cfg):
            return {"placement": cfg.placement, "first": cfg.stages[0][0] if cfg.stages else cfg.prune_layer,
                    "front": cfg.extras["front"], "every": cfg.extras.get("every", 1), "k": cfg.k, "merge": cfg.merge}

        space2 = {**MERGE_SPACE, "first": [v for v in MERGE_SPACE["first"] if v <= depth - 1]}
        structural = {k: v for k, v in space2.items() if k != "front"}
        point = merge_point(make_fitted(dict(MERGE_START)))
        try:
            c = run(make_merge(point))
        except ValueError:  # e.g. a stage would remove more than half of its rows
            c = None
        m_fid = c.fidelity if (c is not None and c.feasible) else float("-inf")
        for _ in range(passes):
            before = m_fid
            # structure (placement, first stage, spacing, k, merge) with the front fitted to the budget
            point, m_fid = descend(point, m_fid, structural, make_fitted, skip_invalid=True, point_of=merge_point)
            # then the front itself (a less back-loaded schedule can preserve more at the same cost)
            point, m_fid = descend(point, m_fid, {"front": space2["front"]}, make_merge, skip_invalid=True)
            if m_fid <= before + 1e-6:
                break
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
