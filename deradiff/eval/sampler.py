"""Shared-noise sampling for the evaluation: every model sees the same initial noise and per-step noise.

Why not `pipe(...)`: the comparison needs, at every denoising step, both the evaluated model's prediction and
the base model's prediction at the *same* state (for the path KL to base), and the exact per-step noise must be
identical across models so that same-seed images are comparable. So this is a short loop over the sampling
core (`deradiff.sampling`): the pipeline's prompt encoding, a stochastic DDIM step (eta > 0), the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from deradiff.sampling.conditions import encode
from deradiff.sampling.ddim import ddim_scheduler, ddim_transition
from deradiff.sampling.guidance import ModelCall, guided
from deradiff.sampling.latents import SharedNoise, decode, latent_shape


@dataclass
class SampleSettings:
    """How every model is sampled (identical across models, or the comparison is meaningless)."""

    steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    branches: str = "auto"  # realigned models only: how both branches run (deradiff.realignment.branches)


@dataclass
class SampleBatch:
    """Images in [0, 1] and the per-sample path KL to the base model (nats, sum over steps; ddpo.py's convention)."""

    images: torch.Tensor
    path_kl: torch.Tensor
    step_kl: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def sample(
    pipe: Any, model: ModelCall, base: ModelCall | None, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings
) -> SampleBatch:
    """Sample one batch with shared noise; `base=None` means the model is the base (path KL 0).

    A model call may return (prediction, base prediction): a realigned model's reference branch *is* the base
    model's prediction at the same state, so it is reused instead of calling `base`.
    """
    if settings.eta <= 0:
        raise ValueError("eval sampling needs a stochastic sampler (eta > 0) for path KL and shared per-step noise")
    scheduler = ddim_scheduler(pipe.scheduler.config, settings.steps)
    shape = latent_shape(pipe, settings.height, settings.width)
    size = (shape[1] * pipe.vae_scale_factor, shape[2] * pipe.vae_scale_factor)
    dtype, device = pipe.unet.dtype, pipe.unet.device
    conditions = encode(pipe, prompts, settings.guidance_scale, size, device)
    noise = SharedNoise(seeds, shape)
    x = (noise.draw(device, torch.float32) * scheduler.init_noise_sigma).to(dtype)
    step_kl: list[torch.Tensor] = []
    for t in scheduler.timesteps:
        pred, base_pred = _predictions(model, base, x, t, conditions, settings.guidance_scale)
        step = ddim_transition(scheduler, pred, t, x, settings.eta)
        if base_pred is not None:
            step_kl.append(step.kl_to(ddim_transition(scheduler, base_pred, t, x, settings.eta)))
        x = step.draw(noise.draw(device, torch.float32)).to(dtype)
    path_kl = torch.stack(step_kl).sum(0) if step_kl else torch.zeros(len(prompts))
    return SampleBatch(images=decode(pipe.vae, x).cpu(), path_kl=path_kl.cpu(), step_kl=step_kl)


def _predictions(model: ModelCall, base: ModelCall | None, x: torch.Tensor, t: torch.Tensor, conditions: Any,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(model prediction, base prediction at the same state or None for the base itself)."""
    pred = guided(model, x, t, conditions, scale)
    if isinstance(pred, tuple):
        return pred
    return pred, None if base is None else guided(base, x, t, conditions, scale)
