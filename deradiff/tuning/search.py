"""Which lambdas a tune samples: an evenly spaced dense pass, then a finer pass around one lambda (pure)."""

from __future__ import annotations

import math
from typing import Sequence

DIGITS = 6  # lambdas are rounded to this many decimals: readable labels, and equal values compare equal


def _rounded(values: Sequence[float]) -> list[float]:
    return sorted({round(float(v), DIGITS) for v in values})


def dense_grid(lambda_min: float, lambda_max: float, count: int) -> list[float]:
    """`count` evenly spaced lambdas from lambda_min to lambda_max, plus 0 (the base: the reference of KID and
    of every image) and 1 (the anchor itself)."""
    step = (lambda_max - lambda_min) / (count - 1)
    return _rounded([lambda_min + i * step for i in range(count)] + [0.0, 1.0])


def refine_grid(explored: Sequence[float], center: float, count: int) -> list[float]:
    """`count` new lambdas between the explored neighbours of `center`: evenly spaced on each side of it (half
    each, the extra one on the left; all on one side at an end of the range)."""
    ordered = _rounded(explored)
    i = min(range(len(ordered)), key=lambda k: abs(ordered[k] - center))
    c = ordered[i]
    sides = [(ordered[i - 1], c)] if i > 0 else []
    sides += [(c, ordered[i + 1])] if i + 1 < len(ordered) else []
    shares = [count] if len(sides) == 1 else [count - count // 2, count // 2]
    new = [lo + (k + 1) * (hi - lo) / (n + 1) for (lo, hi), n in zip(sides, shares) for k in range(n)]
    return [v for v in _rounded(new) if not any(math.isclose(v, e, abs_tol=10.0 ** -DIGITS) for e in ordered)]
