"""DDIM-with-log-probs against diffusers' own DDIMScheduler.step and an independent log-density."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal

import contextlib

from deradiff.sampling.conditions import Conditions, encode
from deradiff.sampling.ddim import ddim_scheduler, ddim_transition
from deradiff.sampling.guidance import guided, unet_call
from deradiff.sampling.rollout import sample_with_logprob
from deradiff.testing import tiny_sd_pipeline


def _scheduler(**kw: object) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1, **kw)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_transition_matches_scheduler_step(prediction_type: str, eta: float) -> None:
    sched = _scheduler(prediction_type=prediction_type)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 5, -1]]:
        x, out, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        expected = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        step = ddim_transition(sched, out, t, x, eta)
        torch.testing.assert_close(step.draw(noise), expected, rtol=1e-5, atol=1e-5)


def test_transition_per_sample_timesteps() -> None:
    sched = _scheduler()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    ts = sched.timesteps[[0, 4, 9]]
    batched = ddim_transition(sched, out, ts, x, 1.0)
    for i, t in enumerate(ts):
        single = ddim_transition(sched, out[i : i + 1], t, x[i : i + 1], 1.0)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)
        torch.testing.assert_close(batched.std[i : i + 1], single.std)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def _conditions(pipe, prompts: list[str], guidance_scale: float = 3.0) -> Conditions:
    return encode(pipe, prompts, guidance_scale, (16, 16), "cpu")


def _scheduler_of(pipe) -> DDIMScheduler:
    return ddim_scheduler(pipe.scheduler.config, 4)


def test_sampled_trajectory_log_probs_and_determinism(pipe) -> None:
    conditions = _conditions(pipe, ["red circle", "blue square"])
    sched = _scheduler_of(pipe)
    kw = dict(num_steps=4, eta=1.0, guidance_scale=3.0, latent_shape=(4, 8, 8))
    traj = sample_with_logprob(pipe.unet, sched, conditions, generator=torch.Generator().manual_seed(3),
                               reference=contextlib.nullcontext, **kw)
    assert traj.latents.shape == (2, 5, 4, 8, 8) and traj.log_probs.shape == (2, 4) and traj.timesteps.shape == (4,)
    torch.testing.assert_close(traj.kl, torch.zeros(2, 4))  # policy vs itself
    again = sample_with_logprob(pipe.unet, sched, conditions, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(traj.latents, again.latents) and again.kl is None
    # recompute step 2's log-prob independently: guided eps -> scheduler-derived mean -> Normal.log_prob
    j = 2
    x_t, x_prev, t = traj.latents[:, j], traj.latents[:, j + 1], traj.timesteps[j]
    eps = guided(unet_call(pipe.unet), x_t, t.expand(2), conditions, 3.0)
    mean = sched.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    std = (1.0 * sched._get_variance(int(t), int(t) - 1000 // 4) ** 0.5).item()
    expected = Normal(mean, std).log_prob(x_prev).flatten(1).sum(1)
    torch.testing.assert_close(traj.log_probs[:, j], expected, rtol=1e-4, atol=1e-2)


def test_kl_to_perturbed_reference_is_positive(pipe) -> None:
    conditions = _conditions(pipe, ["green"], guidance_scale=1.0)
    sched = _scheduler_of(pipe)
    conv = pipe.unet.conv_out

    class Shifted:
        """Reference = the UNet with its output bias shifted by 0.1: a known, nonzero KL."""

        def __enter__(self) -> None:
            conv.bias.data += 0.1

        def __exit__(self, *exc: object) -> None:
            conv.bias.data -= 0.1

    traj = sample_with_logprob(
        pipe.unet, sched, conditions, num_steps=3, eta=1.0, guidance_scale=1.0, latent_shape=(4, 8, 8),
        generator=torch.Generator().manual_seed(0), reference=Shifted,
    )
    assert torch.all(traj.kl > 0)
    # eps differs by exactly 0.1 everywhere -> mean differs by c_t * 0.1 with c_t = sqrt(1-a_prev-s^2) - sqrt(a_prev (1-a_t)/a_t)
    sched.set_timesteps(3)
    t = int(traj.timesteps[0])
    a_t, a_p = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1000 // 3]
    var = sched._get_variance(t, t - 1000 // 3)
    c = (1 - a_p - var).sqrt() - (a_p * (1 - a_t) / a_t).sqrt()
    expected = 4 * 8 * 8 * (c * 0.1) ** 2 / (2 * var)
    assert traj.kl[0, 0].item() == pytest.approx(expected.item(), rel=1e-3)


def test_eta_zero_is_rejected(pipe) -> None:
    conditions = _conditions(pipe, ["x"], guidance_scale=1.0)
    with pytest.raises(ValueError, match="eta"):
        sample_with_logprob(pipe.unet, _scheduler_of(pipe), conditions,
                            num_steps=2, eta=0.0, guidance_scale=1.0, latent_shape=(4, 8, 8))


def test_deterministic_last_step_is_rejected(pipe) -> None:
    conditions = _conditions(pipe, ["x"], guidance_scale=1.0)
    sched = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        sample_with_logprob(pipe.unet, sched, conditions, num_steps=2, eta=1.0, guidance_scale=1.0, latent_shape=(4, 8, 8))


def test_sdxl_conditions_drive_rollouts_and_select_rows(lora_sdxl_pipe) -> None:
    """DDPO's rollouts encode through the sampling core, so SDXL (pooled embeddings + time ids) works there too."""
    pipe = lora_sdxl_pipe
    conditions = encode(pipe, ["red circle", "blue square"], 3.0, (16, 16), "cpu")
    assert set(conditions.cond) == {"encoder_hidden_states", "added_cond_kwargs"} and conditions.guided
    traj = sample_with_logprob(pipe.unet, _scheduler_of(pipe), conditions, num_steps=2, eta=1.0, guidance_scale=3.0,
                               latent_shape=(4, 8, 8), generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape == (2, 3, 4, 8, 8) and torch.isfinite(traj.log_probs).all()
    x, t = traj.latents[:, 1], traj.timesteps[1]
    with torch.no_grad():
        both = guided(unet_call(pipe.unet), x, t.expand(2), conditions, 3.0)
        second = guided(unet_call(pipe.unet), x[1:], t.expand(1), conditions.rows(torch.tensor([1])), 3.0)
    torch.testing.assert_close(second, both[1:], rtol=1e-5, atol=1e-5)
