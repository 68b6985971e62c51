"""Shared-noise sampling for the evaluation: every model sees the same initial noise and per-step noise.

Why not `pipe(...)`: the comparison needs, at every denoising step, both the evaluated model's prediction and
the base model's prediction at the *same* state (for the path KL to base), and the exact per-step noise must be
identical across models so that same-seed images are comparable. So this is a short DDIM (eta > 0) loop that
reuses the pipeline's own components: prompt encoding, the scheduler's `step`, the VAE and image processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from diffusers import DDIMScheduler

from deradiff.losses.ddpo import gaussian_kl_same_std
from deradiff.sampling.ddim import ddim_transition, ddpo_scheduler

# A UNet call: (latents [2B,...] or [B,...], timestep, unet keyword inputs) -> noise prediction.
UnetCall = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor]


@dataclass
class SampleSettings:
    """How every model is sampled (identical across models, or the comparison is meaningless)."""

    steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 1.0
    height: int | None = None
    width: int | None = None
    branches: str = "auto"  # realigned models only: a key of deradiff.realign.denoiser.BRANCH_MODES


@dataclass
class SampleBatch:
    """Images in [0, 1] and the per-sample path KL to the base model (nats, sum over steps; ddpo.py's convention)."""

    images: torch.Tensor
    path_kl: torch.Tensor
    step_kl: list[torch.Tensor] = field(default_factory=list)


def ddim_scheduler(pipe: Any, steps: int) -> DDIMScheduler:
    """DDIM from the pipeline's own config (same betas, prediction type), every step stochastic (as DDPO's)."""
    scheduler = ddpo_scheduler(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def latent_shape(pipe: Any, settings: SampleSettings) -> tuple[int, int, int]:
    """(channels, h, w) of one latent; height/width default to the UNet's native resolution."""
    factor = pipe.vae_scale_factor
    height = settings.height or pipe.unet.config.sample_size * factor
    width = settings.width or pipe.unet.config.sample_size * factor
    return (pipe.unet.config.in_channels, height // factor, width // factor)


class SharedNoise:
    """One CPU generator per (prompt, seed), seeded only by the seed: the same stream for every model."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...]):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = shape

    def draw(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The next noise tensor for every sample (drawn per sample so batch layout never matters)."""
        noise = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(noise).to(device=device, dtype=dtype)


def unet_inputs(pipe: Any, prompts: Sequence[str], settings: SampleSettings) -> dict[str, Any]:
    """UNet keyword inputs for a batch; with CFG the batch is [uncond; cond] as in the diffusers pipelines."""
    cfg = settings.guidance_scale > 1.0
    device = pipe.unet.device
    if hasattr(pipe, "text_encoder_2"):
        return _sdxl_inputs(pipe, prompts, settings, cfg, device)
    cond, uncond = pipe.encode_prompt(list(prompts), device, 1, cfg)
    return {"encoder_hidden_states": torch.cat([uncond, cond]) if cfg else cond}


def _sdxl_inputs(pipe: Any, prompts: Sequence[str], settings: SampleSettings, cfg: bool, device: Any) -> dict[str, Any]:
    """SDXL also conditions on pooled text embeddings and (size, crop, target) time ids."""
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=cfg)
    _, h, w = latent_shape(pipe, settings)
    size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    ).to(device).repeat(len(prompts), 1)
    if cfg:
        cond, pooled, time_ids = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled]), torch.cat([time_ids, time_ids])
    return {"encoder_hidden_states": cond, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def guided(call: UnetCall, latents: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any], scale: float) -> torch.Tensor:
    """Classifier-free-guided prediction exactly as the SD pipelines compute it."""
    if scale <= 1.0:
        return call(latents, t, inputs)
    uncond, cond = call(torch.cat([latents, latents]), t, inputs).chunk(2)
    return uncond + scale * (cond - uncond)


def decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] through the pipeline's VAE and image processor."""
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt").float().cpu()


@torch.no_grad()
def sample(
    pipe: Any, model: UnetCall, base: UnetCall | None, prompts: Sequence[str], seeds: Sequence[int], settings: SampleSettings
) -> SampleBatch:
    """Sample one batch with shared noise; `base=None` means the model is the base (path KL 0)."""
    if settings.eta <= 0:
        raise ValueError("eval sampling needs a stochastic sampler (eta > 0) for path KL and shared per-step noise")
    scheduler = ddim_scheduler(pipe, settings.steps)
    inputs = unet_inputs(pipe, prompts, settings)
    dtype, device = pipe.unet.dtype, pipe.unet.device
    noise = SharedNoise(seeds, latent_shape(pipe, settings))
    x = (noise.draw(device, torch.float32) * scheduler.init_noise_sigma).to(dtype)
    step_kl: list[torch.Tensor] = []
    for t in scheduler.timesteps:
        step = ddim_transition(scheduler, guided(model, x, t, inputs, settings.guidance_scale), t, x, settings.eta)
        if base is not None:
            base_eps = guided(base, x, t, inputs, settings.guidance_scale)
            base_mean = ddim_transition(scheduler, base_eps, t, x, settings.eta).mean
            step_kl.append(gaussian_kl_same_std(step.mean.float(), base_mean.float(), step.std.float()))
        x = (step.mean + step.std * noise.draw(device, torch.float32)).to(dtype)
    path_kl = torch.stack(step_kl).sum(0) if step_kl else torch.zeros(len(prompts))
    return SampleBatch(images=decode(pipe, x), path_kl=path_kl.cpu(), step_kl=step_kl)
