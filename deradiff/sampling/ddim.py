"""DDIM sampling that records what DDPO needs: every x_t, the log-density of each transition, and
(optionally) the closed-form KL of each transition to a reference model at the same x_t.

Written from the DDIM update (Song et al. 2020, eqs. 12 and 16), as in kvablack/ddpo-pytorch's
`ddim_step_with_logprob`, reading alphas_cumprod / timesteps / final_alpha_cumprod from a diffusers
`DDIMScheduler` (never re-deriving the noise schedule). With eta > 0 each step is Gaussian:

    x_{t-1} ~ N(mu(x_t, eps), sigma_t^2 I),  sigma_t = eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))
    mu = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps,  x0_hat = (x_t - sqrt(1-a_t) eps) / sqrt(a_t)

`ddim_transition(...)` followed by adding sigma_t * noise reproduces `DDIMScheduler.step(eta=eta,
variance_noise=noise)` exactly (tested). The reference model is passed as a context-manager factory
(e.g. `lambda: adapter_disabled(unet)`) so this module knows nothing about LoRA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from deradiff.losses.ddpo import gaussian_kl_same_std, gaussian_log_prob

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B,...], t [B]) -> eps [B,...]


def ddpo_scheduler(config: dict) -> DDIMScheduler:
    """A DDIMScheduler from any SD scheduler config, with every step stochastic when eta > 0.

    `set_alpha_to_one=True` (some configs, e.g. diffusers' test defaults) makes the last step's target
    alpha 1 and its variance 0: a Dirac transition without a log-density. Stable Diffusion ships
    `set_alpha_to_one=False` (last step targets alphas_cumprod[0]); we always use that.
    """
    return DDIMScheduler.from_config(config, set_alpha_to_one=False)


@dataclass
class Transition:
    """One Gaussian DDIM step: x_{t-1} ~ N(mean, std^2 I); `std` is [B,1,1,1] (broadcasts)."""

    mean: torch.Tensor
    std: torch.Tensor


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


def guided_denoiser(
    unet: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float
) -> Denoiser:
    """eps(x_t, t) with classifier-free guidance; one batched UNet call for both branches.

    Both the policy and the reference are guided the same way, so their transitions (and the KL between
    them) are those of the sampler users actually run.
    """

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if uncond is None or guidance_scale == 1.0:
            return unet(x, t, encoder_hidden_states=cond).sample
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = out.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return denoise


@dataclass
class Trajectory:
    """A batch of sampled DDIM chains, everything DDPO stores per sampling round.

    latents: [B, T+1, C, h, w] x_T ... x_0; log_probs: [B, T] log p(x_{t-1}|x_t) summed over dims (nats);
    kl: [B, T] per-step KL to the reference (nats, summed over dims) or None; timesteps: [T];
    prompt_embeds / negative_embeds: the conditioning used (negative is None without CFG).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    kl: torch.Tensor | None
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_with_logprob(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    reference: Callable[[], ContextManager] | None = None,
) -> Trajectory:
    """Run DDIM from pure noise, recording each transition's log-prob (and KL to `reference` if given).

    `reference()` must return a context in which `unet` computes the reference model (same x_t, same
    guidance). Noise comes only from `generator`, so a seed fixes the whole trajectory.
    """
    if eta <= 0:
        raise ValueError("log-probs need a stochastic sampler: eta must be > 0")
    scheduler.set_timesteps(num_steps, device=prompt_embeds.device)
    batch, device, dtype = prompt_embeds.shape[0], prompt_embeds.device, prompt_embeds.dtype
    denoise = guided_denoiser(unet, prompt_embeds, negative_embeds, guidance_scale)
    x = randn_tensor((batch, *latent_shape), generator=generator, device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    latents, log_probs, kls = [x], [], []
    for t in scheduler.timesteps:
        step = ddim_transition(scheduler, denoise(x, t), t, x, eta)
        if not torch.all(step.std > 0):
            raise ValueError(
                f"DDIM step at t={int(t)} is deterministic (sigma=0), so it has no log-prob; build the scheduler "
                "with set_alpha_to_one=False (as Stable Diffusion's is), see `ddpo_scheduler`"
            )
        noise = randn_tensor(x.shape, generator=generator, device=device, dtype=dtype)
        x = step.mean + step.std * noise
        log_probs.append(gaussian_log_prob(x, step.mean, step.std))
        if reference is not None:
            with reference():
                ref = ddim_transition(scheduler, denoise(latents[-1], t), t, latents[-1], eta)
            kls.append(gaussian_kl_same_std(step.mean, ref.mean, step.std))
        latents.append(x)
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        kl=torch.stack(kls, dim=1) if kls else None,
        timesteps=scheduler.timesteps.clone(),
        prompt_embeds=prompt_embeds,
        negative_embeds=negative_embeds,
    )


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1] (FloatTensor[B,3,H,W]), the reward interface's input."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    images = vae.decode(latents).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def no_reference() -> ContextManager:
    """A do-nothing context, for callers that want the policy itself as 'reference' (KL == 0; tests)."""
    return contextlib.nullcontext()
