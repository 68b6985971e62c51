"""One stochastic DDIM step as a Gaussian: its mean, std, a sample from it and its log-density.

Written from the DDIM update (Song et al. 2020, eqs. 12 and 16), as in kvablack/ddpo-pytorch's
`ddim_step_with_logprob`, reading alphas_cumprod / timesteps / final_alpha_cumprod from a diffusers
`DDIMScheduler` (never re-deriving the noise schedule). With eta > 0 each step is Gaussian:

    x_{t-1} ~ N(mu(x_t, eps), sigma_t^2 I),  sigma_t = eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))
    mu = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps,  x0_hat = (x_t - sqrt(1-a_t) eps) / sqrt(a_t)

`ddim_transition(...).draw(noise)` reproduces `DDIMScheduler.step(eta=eta, variance_noise=noise)` exactly
(tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from deradiff.losses.ddpo import gaussian_kl_same_std, gaussian_log_prob


def ddim_scheduler(config: Any, steps: int) -> DDIMScheduler:
    """A DDIMScheduler from any SD scheduler config with `steps` timesteps, every step stochastic when eta > 0.

    `set_alpha_to_one=True` (some configs, e.g. diffusers' test defaults) makes the last step's target
    alpha 1 and its variance 0: a Dirac transition without a log-density. Stable Diffusion ships
    `set_alpha_to_one=False` (last step targets alphas_cumprod[0]); we always use that.
    """
    scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass
class Transition:
    """One Gaussian DDIM step: x_{t-1} ~ N(mean, std^2 I); `std` is [B,1,1,1] (broadcasts)."""

    mean: torch.Tensor
    std: torch.Tensor

    def draw(self, noise: torch.Tensor) -> torch.Tensor:
        """x_{t-1} for standard-normal `noise`."""
        return self.mean + self.std * noise

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; mean, std^2 I) summed over every non-batch dim (nats): FloatTensor[B]."""
        return gaussian_log_prob(x, self.mean, self.std)

    def kl_to(self, other: "Transition") -> torch.Tensor:
        """KL(self || other) of two steps from the same x_t (same std), in fp32 or wider, summed over every
        non-batch dim (nats): FloatTensor[B]."""
        return gaussian_kl_same_std(self.mean.float(), other.mean.float(), self.std.float())


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] schedule coefficients as [B,1,1,1], at least float32 (half-precision latents promote to it)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return values.to(like.device, dtype).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_transition(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor, eta: float
) -> Transition:
    """Mean and std of p(x_{t-1} | x_t) for a model output; `timesteps` may differ per sample ([B] or scalar).

    Needs `scheduler.set_timesteps` first (the previous timestep is t - num_train_timesteps // num_steps,
    exactly as `DDIMScheduler.step` computes it).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before ddim_transition")
    if scheduler.config.thresholding:
        raise ValueError("DDIM with log-probs does not support dynamic thresholding")
    t = torch.as_tensor(timesteps, device="cpu").long().expand(sample.shape[0])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to("cpu")
    a_t = alphas[t]
    a_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod))
    a_t, a_prev = _per_sample(a_t, sample), _per_sample(a_prev, sample)
    x0, eps = _x0_and_eps(scheduler, model_output, sample, a_t)
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    return Transition(mean=mean, std=std)


def _x0_and_eps(
    scheduler: DDIMScheduler, output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - a_t).sqrt() * output) / a_t.sqrt(), output
    if kind == "v_prediction":
        return a_t.sqrt() * sample - (1 - a_t).sqrt() * output, a_t.sqrt() * output + (1 - a_t).sqrt() * sample
    raise ValueError(f"prediction_type '{kind}' is not supported by DDIM log-prob sampling (epsilon, v_prediction)")
