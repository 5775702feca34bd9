"""Tuning IPCV for a tower (``ipcv tune``): the search of :mod:`ipcv_core.search`, fed by the
tower's adapter — fidelity through the eager driver, cost by the analytic model
(:mod:`ipcv_core.cost`) or by timing the rewritten graph (:func:`ipcv_core.cost.interleaved_latency`).

Objective: fidelity to the unpruned model — mean cosine similarity of the tower's final tokens.
Constraint (``budget``): the cost of the paper's IPCV at the same retain ratio
(:meth:`IPCVConfig.paper`):

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
) -> TuneResult:
    """Tune IPCV for ``tower`` on ``batches`` (keyword inputs of the tower, e.g. ``pixel_values``).

    ``budget="tokens"``: analytic FLOPs of the block stack <= the paper's IPCV at ``retain``;
    ``budget="latency"``: measured wall time of the rewritten graph <= the paper's (3 % tolerance,
    ``repeats`` interleaved timings per candidate).  ``screen``: the search scores candidates on the
    first ``screen`` batches only; the best few are then confirmed on all of them.
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
    dims = ModelDims(int(prep.hidden.shape[-1]), ffn_params=sum(p.numel() for p in ffn.parameters()))
    lengths = prep.layout.lengths or (prep.hidden.shape[-2],)

    def fidelity(cfg, n):
        vals = [_cosine(run_eager(tower, cfg, **b)[0], r) for b, r in zip(batches[:n], refs[:n])]
        return sum(vals) / len(vals)

    def evaluate(cfg):
        return fidelity(cfg, max(1, screen))

    confirm = (lambda cfg: fidelity(cfg, len(batches))) if screen < len(batches) else None

    reference = IPCVConfig.paper(retain)
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
                confirm=confirm)
