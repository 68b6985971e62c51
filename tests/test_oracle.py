"""The importance-weighted oracle and the bootstrap: closed forms, explicit loops, determinism, the verdict rule."""

from __future__ import annotations

import math

import pytest
import torch

from deradiff.eval.metrics import mean_pairwise_distance, pairwise_distances, weighted_pairwise_mean
from deradiff.eval.oracle import effective_sample_size, kl_to_optimum, tilt
from deradiff.eval.uncertainty import Interval, bootstrap, draw_counts, verdict


def gaussian_oracle(beta: float, a: float, n: int = 4000, replicates: int = 300) -> tuple[dict, float]:
    """Base N(0, 1), reward a*x: the optimum is N(a / beta, 1) with KL a^2 / (2 beta^2)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def estimator(counts: dict[str, torch.Tensor]) -> dict[str, float]:
        t = tilt(a * x, beta, {"x": x}, counts=counts["x"])
        return {"mean": t.means["x"], "kl": t.kl}

    ess = tilt(a * x, beta).ess
    return bootstrap(estimator, {"x": (n,)}, replicates, seed=1), ess


@pytest.mark.parametrize("beta", [4.0, 2.0, 1.0])
def test_gaussian_tilt_matches_the_closed_form_within_its_interval(beta):
    a = 1.0
    got, _ = gaussian_oracle(beta, a)
    assert got["mean"].lo <= a / beta <= got["mean"].hi, got["mean"]
    assert got["kl"].lo <= a * a / (2 * beta * beta) <= got["kl"].hi, got["kl"]
    assert got["mean"].hi - got["mean"].lo < 0.3  # informative, not a vacuous interval


def test_ess_falls_as_beta_shrinks():
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ess = [tilt(x, beta).ess for beta in (8.0, 2.0, 1.0, 0.5, 0.25)]
    assert all(b < a for a, b in zip(ess, ess[1:])), ess
    assert ess[0] > 3900 and ess[-1] < 100


def test_weighted_metrics_equal_an_explicit_weighted_loop():
    g = torch.Generator().manual_seed(3)
    r, m = torch.rand(7, generator=g), torch.rand(7, generator=g)
    images = torch.rand(7, 3, 4, 4, generator=g, dtype=torch.float64)
    beta = 0.3
    got = tilt(r, beta, {"m": m}, pairwise_distances(images))
    w = [math.exp(float(ri) / beta) for ri in r]
    total = sum(w)
    mean_m = sum(wi * float(mi) for wi, mi in zip(w, m)) / total
    mean_r = sum(wi * float(ri) for wi, ri in zip(w, r)) / total
    log_z = math.log(total / len(w))
    pairs = [(i, j) for i in range(7) for j in range(7) if i != j]
    dist = lambda i, j: math.sqrt(float(((images[i] - images[j]) ** 2).mean()))  # noqa: E731
    diversity = sum(w[i] * w[j] * dist(i, j) for i, j in pairs) / sum(w[i] * w[j] for i, j in pairs)
    assert got.means["m"] == pytest.approx(mean_m, rel=1e-12)
    assert got.log_z == pytest.approx(log_z, rel=1e-12)
    assert got.kl == pytest.approx(mean_r / beta - log_z, rel=1e-10)
    assert got.means["diversity"] == pytest.approx(diversity, rel=1e-10)
    assert got.ess == pytest.approx(total**2 / sum(wi * wi for wi in w), rel=1e-10)


def test_counts_weigh_like_repeated_samples():
    r = torch.tensor([0.1, 0.5, 0.2, 0.9], dtype=torch.float64)
    counts = torch.tensor([2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    repeated = torch.tensor([0.1, 0.1, 0.2, 0.9, 0.9, 0.9], dtype=torch.float64)
    a, b = tilt(r, 0.2, {"r": r}, counts=counts), tilt(repeated, 0.2, {"r": repeated})
    assert a.means["r"] == pytest.approx(b.means["r"]) and a.kl == pytest.approx(b.kl) and a.log_z == pytest.approx(b.log_z)


def test_log_space_weights_do_not_overflow_at_tiny_beta():
    r = torch.tensor([0.30, 0.31, 0.25], dtype=torch.float64)  # exp(0.31 / 1e-4) overflows float64
    got = tilt(r, 1e-4, {"r": r})
    assert math.isfinite(got.kl) and math.isfinite(got.log_z)
    assert got.means["r"] == pytest.approx(0.31) and got.ess == pytest.approx(1.0)
    assert got.kl == pytest.approx(math.log(3), rel=1e-6)  # all mass on one of 3 samples


def test_kl_to_optimum_is_zero_for_the_optimum_itself():
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = tilt(x, 0.7, {"r": x})
    assert kl_to_optimum(t.kl, t.means["r"], 0.7, t.log_z) == pytest.approx(0.0, abs=1e-12)
    assert kl_to_optimum(0.0, float(x.mean()), 0.7, t.log_z) > 0  # the base is not the optimum


def test_weighted_pairwise_mean_reduces_to_the_plain_mean_and_skips_self_pairs():
    images = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    d = pairwise_distances(images)
    assert weighted_pairwise_mean(d) == pytest.approx(mean_pairwise_distance(images))
    assert math.isnan(weighted_pairwise_mean(d, torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0])))  # one image, drawn 3x
    assert effective_sample_size(torch.zeros(9, dtype=torch.float64)) == pytest.approx(9.0)


def test_bootstrap_is_deterministic_for_a_fixed_seed():
    x = torch.rand(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimator = lambda c: {"mean": float((x * c["x"]).sum() / c["x"].sum())}  # noqa: E731
    a, b = bootstrap(estimator, {"x": (50,)}, 200, seed=5), bootstrap(estimator, {"x": (50,)}, 200, seed=5)
    c = bootstrap(estimator, {"x": (50,)}, 200, seed=6)
    assert a == b and a != c
    assert a["mean"].value == pytest.approx(float(x.mean())) and a["mean"].lo < a["mean"].value < a["mean"].hi


def test_draw_counts_resample_each_group_to_its_size():
    counts = draw_counts({"prompts": (4,), "oracle": (3, 10)}, torch.Generator().manual_seed(0))
    assert counts["prompts"].sum() == 4 and counts["oracle"].shape == (3, 10)
    assert counts["oracle"].sum(1).tolist() == [10, 10, 10]


@pytest.mark.parametrize("lo, hi, expected", [
    (-0.3, -0.1, "realigned is closer"), (0.1, 0.4, "weight-scaled is closer"),
    (-0.2, 0.1, "indistinguishable"), (0.0, 0.2, "indistinguishable"), (-0.5, 0.0, "indistinguishable"),
    (math.nan, math.nan, "indistinguishable"),
])
def test_an_interval_that_includes_zero_is_never_called_a_win(lo, hi, expected):
    assert verdict(Interval(-0.2, lo, hi), "realigned", "weight-scaled") == expected
