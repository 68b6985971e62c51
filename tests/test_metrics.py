"""Eval metrics against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from deradiff.losses.dpo import per_sample_mse

from deradiff.eval import metrics


def test_mse_and_psnr_by_hand():
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    b[0] = 0.1  # mse 0.01 -> psnr 20 dB
    assert per_sample_mse(a, b).tolist() == pytest.approx([0.01, 0.0])
    value = metrics.psnr(a, b)
    assert value[0].item() == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(value[1].item())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        per_sample_mse(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4))


def test_kid_by_hand_and_properties():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[1.0], [2.0]])
    # kernel (xy + 1)^3 with d = 1: kxx offdiag = 1, kyy offdiag = 27, kxy = [1,1,8,27] mean 37/4
    assert metrics.kid(x, y) == pytest.approx(1 + 27 - 2 * 37 / 4)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(200, 4, generator=g)
    assert abs(metrics.kid(big[:100], big[100:])) < 0.05  # same distribution: near 0 (unbiased)
    assert metrics.kid(big[:100], big[100:] + 2.0) > 1.0
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kid(x[:1], y)


def test_within_prompt_diversity_by_hand():
    images = torch.zeros(4, 1, 1, 2)
    images[1] = 1.0  # prompt "a": distance sqrt(2)/sqrt(2) = 1
    prompts = ["a", "a", "b", "b"]  # prompt "b": identical images, distance 0
    assert metrics.within_prompt_diversity(images, prompts) == pytest.approx(0.5)
    assert math.isnan(metrics.within_prompt_diversity(images[:2], ["a", "b"]))


def test_normalized_error():
    assert metrics.normalized_error(approx=0.9, target=1.0, base=0.0) == pytest.approx(0.1)
    assert metrics.normalized_error(approx=0.0, target=1.0, base=0.0) == pytest.approx(1.0)
    assert math.isnan(metrics.normalized_error(1.0, 2.0, 2.0))


def test_kid_features_are_standardized_on_the_base_set():
    from deradiff.eval.scoring import standardized

    g = torch.Generator().manual_seed(0)
    feats = {"base": torch.randn(50, 3, generator=g) * 1000 + 5, "other": torch.randn(50, 3, generator=g) * 1000 + 5}
    out = standardized(feats)
    assert torch.allclose(out["base"].mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out["base"].std(0), torch.ones(3), atol=1e-4)
    assert abs(metrics.kid(out["base"], out["other"])) < 0.5  # same distribution: O(1)-scale, near 0


def test_paired_kid_is_zero_on_identical_sets_and_skips_same_seed_pairs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g)
    assert metrics.kid(x, x, paired=True) == pytest.approx(0.0, abs=1e-9)
    assert metrics.kid(x, x) < 0  # the unpaired estimate counts each row against itself
    assert metrics.kid(x, x + 3.0, paired=True) > 1.0


def test_kid_stays_finite_when_the_base_never_uses_a_feature_dimension():
    """A ReLU feature that is 0 on every base image but active on an aligned model's: scaled by a tenth of a
    typical dimension's spread, not by its own ~0 std (which gave KIDs of 1e22 in a tiny-world tune)."""
    from deradiff.eval.scoring import standardized

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=gen).abs()
    base[:, 0] = 0.0  # never active on the base
    aligned = torch.randn(16, 8, generator=gen).abs() + 0.5
    scaled = standardized({"base": base, "aligned": aligned})
    assert scaled["aligned"][:, 0].abs().max() < 100  # was ~1e6 (divided by the 1e-6 floor)
    value = metrics.kid(scaled["aligned"], scaled["base"], paired=True)
    assert math.isfinite(value) and 0 < value < 1e6  # the old 1e-6 floor gave 6e33 here
