"""Pure metrics for the realigned-vs-retrained comparison (no pipelines, no I/O; tested by hand numbers).

Images are FloatTensor[B, 3, H, W] in [0, 1]. Per-sample metrics return FloatTensor[B]; set-level metrics
(KID, diversity) return floats. Everything is deterministic.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from deradiff.losses.dpo import per_sample_mse


def psnr(a: torch.Tensor, b: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample (inf for identical images)."""
    mse = per_sample_mse(a, b).double()
    return (10.0 * torch.log10(max_value**2 / mse)).float()


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """k(x, y) = (x.y / d + coef0)^degree, the kernel KID uses (Binkowski et al. 2018)."""
    return (x.double() @ y.double().T / x.shape[1] + coef0) ** degree


def kid(features_x: torch.Tensor, features_y: torch.Tensor, degree: int = 3, coef0: float = 1.0, paired: bool = False) -> float:
    """Kernel Inception Distance: the unbiased MMD^2 estimate between two feature sets (>= 2 rows each).

    Unbiased, so it works with the few samples a tiny study draws (unlike FID) and may be slightly negative.
    `paired=True` for sets drawn with shared noise (row i of both from the same seed): the cross term then
    skips the i = i pairs, which are not independent draws and would bias KID strongly negative
    (a set against itself gives exactly 0).
    """
    m, n = features_x.shape[0], features_y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx = polynomial_kernel(features_x, features_x, degree, coef0)
    kyy = polynomial_kernel(features_y, features_y, degree, coef0)
    kxy = polynomial_kernel(features_x, features_y, degree, coef0)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    if paired:
        if m != n:
            raise ValueError(f"paired KID needs equal set sizes, got {m} and {n}")
        cross = (kxy.sum() - kxy.diagonal().sum()) / (m * (m - 1))
    else:
        cross = kxy.mean()
    return float(term_x + term_y - 2.0 * cross)


def pairwise_distances(images: torch.Tensor) -> torch.Tensor:
    """RMS pixel distance between every pair of a set [N, N] (float64)."""
    flat = images.double().flatten(1)
    return torch.cdist(flat, flat) / math.sqrt(flat.shape[1])


def weighted_pairwise_mean(distances: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """sum_{i != j} w_i w_j d_ij / sum_{i != j} w_i w_j: the mean distance between two distinct draws.

    Weights are importance weights (the oracle) or resample counts (the bootstrap; a sample drawn twice is
    not a pair with itself); None weighs every sample once. NaN with fewer than two weighted samples.
    """
    w = torch.ones(len(distances), dtype=torch.float64) if weights is None else weights.double()
    d = distances.double()
    pair_weight = w.sum() ** 2 - (w * w).sum()
    if pair_weight <= 0:
        return float("nan")
    return float((w @ d @ w - (w * w * d.diagonal()).sum()) / pair_weight)


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean RMS pixel distance over all pairs of a set: 0 when every seed gives the same image."""
    return weighted_pairwise_mean(pairwise_distances(images)) if images.shape[0] > 1 else float("nan")


def within_prompt_diversity(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Average over prompts of the mean pairwise distance among that prompt's seeds (mode-collapse check)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    values = [mean_pairwise_distance(images[idx]) for idx in groups.values() if len(idx) > 1]
    return float(sum(values) / len(values)) if values else float("nan")


def normalized_error(approx: float, target: float, base: float, min_gap: float = 1e-12) -> float:
    """|approx - target| / |target - base|: 0 = realignment reproduces retraining, 1 = no better than base.

    Normalizing by the retrained-vs-base gap makes errors comparable across metrics of different scales; the
    value is NaN when retraining did not move the metric (nothing to approximate).
    """
    gap = abs(target - base)
    if not math.isfinite(gap) or gap < min_gap:
        return float("nan")
    return abs(approx - target) / gap
