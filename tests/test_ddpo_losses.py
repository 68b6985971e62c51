"""DDPO math against independent computations (torch.distributions) and hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from deradiff.losses.ddpo import (
    PerPromptStatTracker,
    gaussian_kl_same_std,
    gaussian_log_prob,
    kl_regularized_reward,
    ppo_clipped_loss,
)


def test_log_prob_matches_torch_normal() -> None:
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64).view(3, 1, 1, 1)
    expected = Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)


def test_log_prob_hand_computed() -> None:
    # one sample, two dims: x=(1, 0), mean=(0, 0), std=2 -> 2*(-log 2 - log sqrt(2 pi)) - 1/8
    value = gaussian_log_prob(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), 2.0)
    assert value.item() == pytest.approx(-2 * math.log(2) - math.log(2 * math.pi) - 0.125, abs=1e-6)


def test_kl_matches_torch_kl_divergence() -> None:
    g = torch.Generator().manual_seed(1)
    ma, mr = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    std = torch.tensor([0.1, 0.7], dtype=torch.float64).view(2, 1, 1, 1)
    s = std.expand_as(ma)
    expected = kl_divergence(Normal(ma, s), Normal(mr, s)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl_same_std(ma, mr, std), expected)


def test_kl_hand_computed_and_zero_for_equal_means() -> None:
    # ||(3,4)||^2 / (2 * 0.5^2) = 25 / 0.5 = 50
    assert gaussian_kl_same_std(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2), 0.5).item() == pytest.approx(50.0)
    m = torch.randn(2, 8)
    assert torch.all(gaussian_kl_same_std(m, m, 0.2) == 0)


def test_kl_regularized_reward() -> None:
    out = kl_regularized_reward(torch.tensor([1.0, 2.0]), torch.tensor([10.0, 0.0]), beta=0.05)
    torch.testing.assert_close(out, torch.tensor([0.5, 2.0]))


def test_ppo_clipped_loss_hand_computed() -> None:
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    ratio = torch.tensor([1.5, 1.5, 0.5, 1.0])
    loss, stats = ppo_clipped_loss(adv, ratio.log(), clip_range=0.2)
    # per sample max(-A r, -A clip(r)): [-1.2, 1.5, -1.0, 2.0] -> mean 0.325
    assert loss.item() == pytest.approx(0.325, abs=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(0.75)
    assert stats.approx_kl.item() == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4, rel=1e-5)


def test_ppo_gradient_is_policy_gradient_at_ratio_one() -> None:
    log_ratio = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss, _ = ppo_clipped_loss(adv, log_ratio, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(log_ratio.grad, -adv / 3)


def test_stat_tracker_per_prompt_and_fallback() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv, std = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 10.0]))
    # "a" has 2 values -> its own stats (mean 2, std 1); "b" has 1 < min_count -> batch stats
    batch = torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)
    assert adv[:2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    assert adv[2].item() == pytest.approx(((10 - batch.mean()) / batch.std(unbiased=False)).item(), abs=1e-5)
    assert std[0].item() == pytest.approx(1.0, abs=1e-5)
    # the buffer persists across rounds and is bounded
    tracker.update(["a", "a", "a"], torch.tensor([5.0, 5.0, 5.0]))
    assert list(tracker.buffers["a"]) == [3.0, 5.0, 5.0, 5.0]


def test_stat_tracker_state_roundtrip_and_global_mode() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=1)
    tracker.update(["x", "y"], torch.tensor([1.0, 2.0]))
    copy = PerPromptStatTracker(buffer_size=8, min_count=1)
    copy.load_state_dict(tracker.state_dict())
    r = torch.tensor([4.0, 0.0])
    torch.testing.assert_close(copy.update(["x", "y"], r)[0], tracker.update(["x", "y"], r)[0])
    plain = PerPromptStatTracker(buffer_size=0)
    adv, _ = plain.update(["x", "x"], torch.tensor([0.0, 2.0]))
    assert adv.tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
