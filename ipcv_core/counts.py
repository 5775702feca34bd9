"""The retain-ratio -> token-count rule (``K = ceil(r * n)``, exact on ``r`` as a fraction)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

__all__ = ["num_keep", "retain_fraction"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def retain_fraction(retain: float) -> Fraction:
    """The exact rational used for ``retain`` (float noise removed: 0.35 -> 7/20)."""
    return Fraction(retain).limit_denominator(10**6)


def num_keep(n: int, retain: float, min_keep: int = 1):
    """Tokens kept out of ``n`` prunable ones: ``min(n, max(ceil(r*n), min_keep, 1))``.

    ``n`` may be a Python int or a ``torch.SymInt`` (export with a dynamic token dimension): the
    rounding is integer arithmetic ``(p*n + q - 1) // q`` on ``r = p/q``.  The clamps use
    ``torch.sym_max/sym_min`` only when needed, so a symbolic ``n`` gives a symbolic expression.
    """
    frac = retain_fraction(retain)
    p, q = frac.numerator, frac.denominator
    if _is_int(n):
        if n < 0:
            raise ValueError(f"segment length must be >= 0, got {n}")
        if n == 0:
            return 0
        return min(n, max((p * n + q - 1) // q, min_keep, 1))
    import torch

    k = (p * n + q - 1) // q if p != q else n
    if min_keep > 1:
        k = torch.sym_min(n, torch.sym_max(k, min_keep))
    # p/q > 0 and n >= 1 give k >= 1 already; k <= n since p <= q.
    return k
