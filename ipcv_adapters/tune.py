"""Tuning IPCV for a tower (``ipcv tune``): the search of :mod:`ipcv_core.search`, fed by the
tower's adapter — fidelity through the eager driver, cost by the analytic model
(:mod:`ipcv_core.cost`) or by timing the rewritten graph (:func:`ipcv_core.cost.interleaved_latency`).

Objective: fidelity to the unpruned model — mean cosine similarity of the tower's final tokens.
Constraint (``budget``): the cost of the paper's IPCV at the same retain ratio with the tower's
default ``l_p`` / ``Δ`` / ``k`` (:meth:`TowerAdapter.resolve_config`; the paper's 3 / 7 / 10 for
most towers):

* ``"tokens"``: analytic FLOPs of the block stack from the rows every block processes — deterministic;
* ``"latency"``: measured wall time of the rewritten graph, interleaved with the reference, ratio of
  medians (noisy on a busy machine; a 3 % tolerance is allowed).

Candidates run through the eager driver (the rewritten graph computes the same, as the tests
check), so no capture per candidate.  The result is a JSON config that
``rewrite(tower, IPCVConfig.from_json(path))`` accepts.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

from ipcv_core.config import IPCVConfig
from ipcv_core.cost import ModelDims, config_flops, interleaved_latency
from ipcv_core.search import TuneResult, tune

from .registry import find_adapter, rewrite_with_adapter, run_eager

__all__ = ["tune_tower", "LATENCY_TOLERANCE"]

LATENCY_TOLERANCE = 0.03


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
    repeats: int = 5,
    max_cost: float = 1.0,
    families: Sequence[str] = ("prune", "merge"),
) -> TuneResult:
    """Tune IPCV for ``tower`` on ``batches`` (keyword inputs of the tower, e.g. ``pixel_values``).

    ``budget="tokens"``: analytic FLOPs of the block stack <= the paper's IPCV at ``retain``;
    ``budget="latency"``: measured wall time of the rewritten graph <= the paper's (3 % tolerance,
    ``repeats`` interleaved timings per candidate).  ``screen``: the search scores candidates on the
    first ``screen`` batches only; the best few are then confirmed on all of them.  ``max_cost``:
    the budget as a multiple of the paper's cost (1.0: no more FLOPs / time than the paper's IPCV;
    the frontier between, e.g. ``0.9`` or ``1.2``); ``families``: see :func:`ipcv_core.search.tune`.
    """
    if budget not in ("tokens", "latency"):
        raise ValueError(f"budget must be 'tokens' or 'latency', got {budget!r}")
    adapter = find_adapter(tower)
    with torch.no_grad():
        refs = [tower(**b) for b in batches]
    prep = adapter.prepare(**batches[0])
    depth = adapter.depth
    has_grid = prep.layout.grids is not None
    ffn = adapter.blocks[0].get_submodule(adapter.spec.ffn)
    width = int(prep.hidden.shape[-1])
    cfg_t = getattr(tower, "config", None)
    heads = getattr(cfg_t, "num_attention_heads", None) or getattr(cfg_t, "num_heads", None)
    # the bipartite matching runs on head-averaged keys: the head dim wide
    dims = ModelDims(width, ffn_params=sum(p.numel() for p in ffn.parameters()),
                     key_dim=width // int(heads) if heads else None)
    lengths = prep.layout.lengths or (prep.hidden.shape[-2],)

    def fidelity(cfg, n):
        vals = [_cosine(run_eager(tower, cfg, **b)[0], r) for b, r in zip(batches[:n], refs[:n])]
        return sum(vals) / len(vals)

    def evaluate(cfg):
        return fidelity(cfg, max(1, screen))

    confirm = (lambda cfg: fidelity(cfg, len(batches))) if screen < len(batches) else None

    reference = adapter.resolve_config(IPCVConfig(retain=retain))  # the paper's method, the tower's defaults
    if budget == "tokens":
        def flops(cfg):
            return sum(config_flops(cfg, n, prep.layout.protected, depth, dims) for n in lengths)

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
                return interleaved_latency(lambda: ref_tower(**b0), lambda: t(**b0), repeats, warmup=1).ratio
        tol = LATENCY_TOLERANCE
    return tune(evaluate, cost, retain, depth, has_grid=has_grid, passes=passes, tolerance=tol, progress=progress,
                confirm=confirm, reference=reference, max_cost=max_cost, families=families)
