"""Rollouts for reward training (DDPO): DDIM chains from pure noise with every x_t, the log-density of each
transition and, optionally, the closed-form KL of each transition to a reference model at the same x_t.

The reference is passed as a context-manager factory (e.g. `lambda: adapter_disabled(unet)`), so this module
knows nothing about LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from deradiff.sampling.conditions import Conditions
from deradiff.sampling.ddim import ddim_transition
from deradiff.sampling.guidance import guided, unet_call


@dataclass
class Trajectory:
    """A batch of sampled DDIM chains, everything DDPO stores per sampling round.

    latents: [B, T+1, C, h, w] x_T ... x_0; log_probs: [B, T] log p(x_{t-1}|x_t) summed over dims (nats);
    kl: [B, T] per-step KL to the reference (nats, summed over dims) or None; timesteps: [T];
    conditions: the prompt conditioning used.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    kl: torch.Tensor | None
    timesteps: torch.Tensor
    conditions: Conditions

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_with_logprob(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    conditions: Conditions,
    *,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    latent_shape: tuple[int, int, int],
    generator: torch.Generator | None = None,
    reference: Callable[[], ContextManager] | None = None,
) -> Trajectory:
    """Run `num_steps` DDIM steps from pure noise, recording each transition's log-prob (and KL to `reference`).

    `reference()` must return a context in which `unet` computes the reference model (same x_t, same
    guidance). Noise comes only from `generator`, so a seed fixes the whole trajectory.
    """
    if eta <= 0:
        raise ValueError("log-probs need a stochastic sampler: eta must be > 0")
    cond = conditions.cond["encoder_hidden_states"]
    batch, device, dtype = cond.shape[0], cond.device, cond.dtype
    scheduler.set_timesteps(num_steps, device=device)
    model = unet_call(unet)
    x = randn_tensor((batch, *latent_shape), generator=generator, device=device, dtype=dtype)
    x = x * scheduler.init_noise_sigma
    latents, log_probs, kls = [x], [], []
    for t in scheduler.timesteps:
        t_rows = t.expand(batch)  # one timestep per row, on the latents' device
        step = ddim_transition(scheduler, guided(model, x, t_rows, conditions, guidance_scale), t, x, eta)
        if not torch.all(step.std > 0):
            raise ValueError(
                f"DDIM step at t={int(t)} is deterministic (sigma=0), so it has no log-prob; build the scheduler "
                "with set_alpha_to_one=False (as Stable Diffusion's is), see `ddim_scheduler`"
            )
        x = step.draw(randn_tensor(x.shape, generator=generator, device=device, dtype=dtype))
        log_probs.append(step.log_prob(x))
        if reference is not None:
            with reference():
                ref = ddim_transition(scheduler, guided(model, latents[-1], t_rows, conditions, guidance_scale),
                                      t, latents[-1], eta)
            kls.append(step.kl_to(ref))
        latents.append(x)
    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        kl=torch.stack(kls, dim=1) if kls else None,
        timesteps=scheduler.timesteps.clone(),
        conditions=conditions,
    )
