"""Diffusion-DPO loss against hand-computed numbers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from deradiff.losses.dpo import per_sample_mse
from deradiff.losses.dpo import diffusion_dpo_loss
from deradiff.training.dpo_step import regression_target


def test_loss_matches_hand_computation():
    # one pair, 2 "pixels"; rows: [winner, loser]
    target = torch.zeros(2, 2)
    model = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # mse_w = 0.5, mse_l = 0
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # ref_w = 0, ref_l = 1
    out = diffusion_dpo_loss(model, ref, target, beta=2.0)
    # margin = -beta/2 * ((0.5 - 0) - (0 - 1)) = -1.5 ; loss = -log sigmoid(-1.5) = log(1 + e^1.5)
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(1.5)), rel=1e-6)
    assert out.loss.item() == pytest.approx(1.7014132, rel=1e-6)
    assert out.margin.tolist() == [pytest.approx(-1.5)]
    assert out.metrics() == pytest.approx({"implicit_acc": 0.0, "model_diff": 0.5, "ref_diff": -1.0, "reward_margin": -1.5})


def test_loss_two_pairs_mean_accuracy_and_hinge():
    target = torch.zeros(4, 1, 2)
    # pair 1: policy lowers the winner error vs reference (margin > 0); pair 2: tie (margin 0)
    model = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]]])
    ref = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]]])
    out = diffusion_dpo_loss(model, ref, target, beta=0.5)
    # pair 1: model_diff = 0 - 1 = -1, ref_diff = 0 -> margin = -0.25 * -1 = 0.25; pair 2: margin 0
    expected = (math.log(1 + math.exp(-0.25)) + math.log(2)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.implicit_acc.item() == pytest.approx(0.75)  # 1 win + half a tie over 2 pairs
    hinge = diffusion_dpo_loss(model, ref, target, beta=0.5, loss_type="hinge")
    assert hinge.loss.item() == pytest.approx(((1 - 0.25) + 1) / 2)


def test_gradient_flows_only_through_policy():
    model = torch.randn(4, 3, requires_grad=True)
    ref = torch.randn(4, 3, requires_grad=True)
    diffusion_dpo_loss(model, ref, torch.zeros(4, 3), beta=10.0).loss.backward()
    assert model.grad is not None and model.grad.abs().sum() > 0
    assert ref.grad is None


def test_per_sample_mse_and_odd_batch():
    assert per_sample_mse(torch.ones(2, 3, 4), torch.zeros(2, 3, 4), torch.float32).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        diffusion_dpo_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2), beta=1.0)


def test_dpo_step_targets_epsilon_and_v_prediction_by_hand():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = regression_target(sched, "v_prediction", x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)  # v = sqrt(a) eps - sqrt(1 - a) x0
    assert regression_target(sched, "epsilon", x0, noise, t) is noise
    with pytest.raises(ValueError):
        regression_target(sched, "sample", x0, noise, t)
