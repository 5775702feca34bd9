"""``ipcv tune``: pick the IPCV variant that preserves the most for a user's own model, from a few
unlabeled images.  Training-free: forward passes only.

Objective: fidelity to the unpruned model — mean cosine similarity of the tower's final tokens.
Constraint (``budget``): the cost of the paper's IPCV at the same retain ratio (l_p=3, Δ=7, k=10):
* ``"tokens"``: analytic FLOPs of the block stack from the rows every block processes (queries,
  keys/values, FFN), counted from the model's shapes — deterministic;
* ``"latency"``: measured wall time of the rewritten graph, interleaved with the reference, median
  of repeats (noisy on a busy machine; a 3 % tolerance is allowed).

Search, two families, each by coordinate descent (two passes): (1) from the paper's configuration
over selection x reconstruction (+ weighting) x k x (l_p, Δ) x merge; (2) gradual bipartite
merging (ToMe-style, a prune stage at every block, with IPCV's NGR at reintegration) over the first
merging block x how front-loaded the schedule is x k x merge.  Each candidate is first checked
against the budget (cheap), then scored on the images; the best of both families wins.  Candidates run through ipcv_core's eager driver (the
rewritten graph computes the same, as the test-suite checks), so no capture per candidate.
The result is written as a JSON config file that ``rewrite(..., config=IPCVConfig.from_json(path))``
and ``ipcv export --config`` accept.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ipcv_core.config import IPCVConfig, gradual_stages, num_keep

__all__ = ["TuneResult", "tune", "block_flops", "config_flops", "merge_family_config", "PAPER", "MERGE_SPACE"]

PAPER = dict(prune_layer=3, as_depth=7, k=10, selection="score", reconstruction="feature", weighting="mean", merge="none")


def block_flops(q_rows: int, kv_rows: int, ffn_rows: int, dim: int, ffn_params: int) -> int:
    """FLOPs (2 x multiply-adds) of one pre-norm block: q and out projections on query rows, k/v
    projections on key/value rows, attention core ``q_rows x kv_rows``, FFN on FFN rows (one
    multiply-add per FFN weight and row)."""
    proj = 2 * dim * dim * (2 * q_rows + 2 * kv_rows)
    core = 2 * 2 * q_rows * kv_rows * dim
    ffn = 2 * ffn_rows * ffn_params
    return proj + core + ffn


def config_flops(cfg: Optional[IPCVConfig], n_tokens: int, protected: int, depth: int, dim: int, ffn_params: int) -> int:
    """FLOPs of the block stack for one segment of ``n_tokens`` (protected included), following the
    config's prune schedule (every stage), AS range, neighbour search and NGR."""
    if cfg is None:
        return depth * block_flops(n_tokens, n_tokens, n_tokens, dim, ffn_params)
    sched = dict(cfg.schedule)
    rows = n_tokens
    total = 0
    prev = n_tokens
    for b in range(depth):
        if b in sched:
            K = protected + num_keep(n_tokens - protected, sched[b], cfg.min_keep)
            R = prev - K
            total += 2 * R * K * dim + 2 * R * cfg.k * dim  # neighbour search + final NGR
            if cfg.selection == "bipartite":  # key projection on the incoming rows + A x B similarities
                # (similarities counted at the model width, an upper bound: the metric is head-averaged)
                total += 2 * prev * dim * dim + 2 * prev * (prev // 2) * dim
            prev = rows = K
        if cfg.prune_layer <= b < cfg.as_end:
            total += block_flops(rows, n_tokens, rows, dim, ffn_params) + 2 * (n_tokens - rows) * cfg.k * dim
        else:
            total += block_flops(rows, rows, rows, dim, ffn_params)
    return total


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
            out.append(f"{c.fidelity:8.4f} | {c.cost:5.2f} | {'y' if c.feasible else 'n':>2} | {_short(c.config)}")
        return "\n".join(out)


def _short(cfg: IPCVConfig) -> str:
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
    reference = IPCVConfig(retain=retain, **PAPER)
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
                progress(f"{c.fidelity:.4f}  cost {c.cost:.2f}  {_short(cfg)}")
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
                progress(f"confirm {c.fidelity:.4f}  {_short(c.config)}")
        cur = max(feas + [seen_ref], key=lambda c: c.fidelity).config
    return TuneResult(cur, reference, table, time.perf_counter() - t0)


def measure_latency(fn: Callable[[], object], ref_fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn`` over the median of ``ref_fn``, interleaved."""
    a, b = [], []
    fn(), ref_fn()  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref_fn()
        b.append(time.perf_counter() - t)
    return statistics.median(a) / statistics.median(b)



# ---------------------------------------------------------------------------------------------
# towers (through ipcv_adapters' registry; no model names here)
def _cosine(out, ref) -> float:
    a = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    b = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def tune_tower(
    tower: torch.nn.Module,
    batches: Sequence[Dict[str, Any]],
    retain: float,
    budget: str = "tokens",
    passes: int = 2,
    progress: Optional[Callable[[str], None]] = None,
    screen: int = 1,
) -> TuneResult:
    """Tune IPCV for ``tower`` on ``batches`` (keyword inputs of the tower, e.g. ``pixel_values``).

    ``budget="tokens"``: analytic FLOPs of the block stack <= the paper's IPCV at ``retain``;
    ``budget="latency"``: measured wall time of the rewritten graph <= the paper's (3 % tolerance).
    ``screen``: the search scores candidates on the first ``screen`` batches only; the best few are
    then confirmed on all of them.
    """
    from ipcv_adapters.registry import find_adapter, rewrite_with_adapter, run_eager

    if budget not in ("tokens", "latency"):
        raise ValueError(f"budget must be 'tokens' or 'latency', got {budget!r}")
    adapter = find_adapter(tower)
    with torch.no_grad():
        refs = [tower(**b) for b in batches]
    prep = adapter.prepare(**batches[0])
    depth = adapter.depth
    has_grid = prep.layout.grids is not None
    dim = prep.hidden.shape[-1]
    ffn_params = sum(p.numel() for p in adapter.blocks[0].get_submodule(adapter.spec.ffn).parameters())
    lengths = prep.layout.lengths or (prep.hidden.shape[-2],)

    def fidelity(cfg, n):
        vals = [_cosine(run_eager(tower, cfg, **b)[0], r) for b, r in zip(batches[:n], refs[:n])]
        return sum(vals) / len(vals)

    def evaluate(cfg):
        return fidelity(cfg, max(1, screen))

    confirm = (lambda cfg: fidelity(cfg, len(batches))) if screen < len(batches) else None

    reference = IPCVConfig(retain=retain, **PAPER)
    if budget == "tokens":
        def flops(cfg):
            return sum(config_flops(cfg, n, prep.layout.protected, depth, dim, ffn_params) for n in lengths)

        ref_flops = flops(reference)

        def cost(cfg):
            return flops(cfg) / ref_flops
        tol = 0.0
    else:
        ref_tower = rewrite_with_adapter(tower, reference)
        b0 = batches[0]

        def cost(cfg):
            t = ref_tower.with_config(cfg)
            with torch.no_grad():
                return measure_latency(lambda: t(**b0), lambda: ref_tower(**b0))
        tol = 0.03
    return tune(evaluate, cost, retain, depth, has_grid=has_grid, passes=passes, tolerance=tol, progress=progress,
                confirm=confirm)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ipcv tune MODEL --images DIR --retain 0.35 [--budget latency|tokens] --out tuned.json``."""
    import argparse
    import inspect

    from ipcv_adapters.images import list_images, load_images

    ap = argparse.ArgumentParser(prog="ipcv tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL", help="local path or hub id of a supported checkpoint")
    ap.add_argument("--images", required=True, metavar="DIR", help="folder of unlabeled images")
    ap.add_argument("--retain", type=float, default=0.35)
    ap.add_argument("--budget", choices=("tokens", "latency"), default="tokens")
    ap.add_argument("--num-images", dest="num_images", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0, help="skip the first OFFSET images of DIR (sorted by name), "
                    "e.g. to keep tuning images apart from evaluation images")
    ap.add_argument("--batch", type=int, default=4, help="images per forward pass")
    ap.add_argument("--screen-batches", dest="screen", type=int, default=1,
                    help="batches used to screen candidates (the best few are confirmed on all)")
    ap.add_argument("--size", type=int, default=448, help="square image size in pixels")
    ap.add_argument("--passes", type=int, default=2, help="coordinate-descent passes per family (>= 1)")
    ap.add_argument("--out", default="ipcv_tuned.json", metavar="PATH")
    args = ap.parse_args(argv)
    if not (0.0 < args.retain <= 1.0):
        ap.error(f"--retain must be in (0, 1], got {args.retain}")
    from ipcv_adapters.cli import load_tower  # model loading is model knowledge

    tower, _ = load_tower(args.model)
    if "pixel_values" not in inspect.signature(tower.forward).parameters:
        ap.error(f"ipcv tune feeds images as pixel_values; {type(tower).__name__} takes other inputs "
                 "(call ipcv_compile.tune.tune_tower with your own input batches)")
    files = list_images(args.images)[args.offset : args.offset + args.num_images]
    if not files:
        ap.error(f"no images left in {args.images} after --offset {args.offset}")
    batches = [dict(pixel_values=load_images(files[i : i + args.batch], args.size).to(tower.dtype))
               for i in range(0, len(files), args.batch)]
    print(f"ipcv tune: {type(tower).__name__}, {len(files)} images at {args.size}px, retain {args.retain}, "
          f"budget {args.budget}", flush=True)
    if args.passes < 1:
        ap.error(f"--passes must be >= 1, got {args.passes}")
    res = tune_tower(tower, batches, args.retain, args.budget, passes=args.passes,
                     progress=lambda m: print("  " + m, flush=True), screen=args.screen)
    print(res.format_table())
    print(f"\nbest: {_short(res.best)}\nreference (paper): {_short(res.reference)}\n({res.seconds:.0f} s)")
    res.best.to_json(args.out)
    print(f"wrote {args.out}  (use: ipcv_compile.rewrite(tower, config=IPCVConfig.from_json({args.out!r})))")
    return 0
if __name__ == "__main__":
    raise SystemExit(main())
