"""A linear probe in plain torch: multinomial logistic regression (L2-regularised, full-batch
L-BFGS) on standardised features; the weight decay is chosen by k-fold cross-validation on the
training split only (the test split never informs a choice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Probe", "fit_probe"]


@dataclass
class Probe:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float
    cv_accuracy: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.logits(x).argmax(-1) == y).double().mean().item()


def _train(z: torch.Tensor, y: torch.Tensor, classes: int, wd: float, iters: int = 100):
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decays: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0),
              folds: int = 5, seed: int = 0) -> Probe:
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = perm.chunk(folds)
    best = None
    for wd in weight_decays:
        accs = []
        for i in range(folds):
            te = parts[i]
            tr = torch.cat([p for j, p in enumerate(parts) if j != i])
            w, b = _train(z[tr], y[tr], classes, wd)
            accs.append(((z[te] @ w + b).argmax(-1) == y[te]).double().mean().item())
        acc = sum(accs) / len(accs)
        if best is None or acc > best[1]:
            best = (wd, acc)
    w, b = _train(z, y, classes, best[0])
    return Probe(mean, std, w, b, best[0], best[1])
