"""Latents: their shape for a pipeline, shared noise streams, and decoding to images."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def latent_shape(pipe: Any, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(channels, h, w) of one latent for images of height x width pixels (default: the UNet's native size)."""
    factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * factor
    return (pipe.unet.config.in_channels, (height or native) // factor, (width or native) // factor)


class SharedNoise:
    """One CPU generator per sample, seeded only by its seed: every model draws the same noise for the same seed."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...]):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = shape

    def draw(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The next noise tensor for every sample (drawn per sample so batch layout never matters)."""
        noise = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(noise).to(device=device, dtype=dtype)


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to fp32 images in [0, 1] ([B,3,H,W], the reward interface's input); keeps the graph
    when called with grad enabled (reward-gradient training)."""
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
