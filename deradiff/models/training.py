"""Loading a base pipeline for training a LoRA on it (every trainer: DPO, DDPO, reward gradients).

Why here and not in `deradiff.training`: this is model loading (dtype and device of each component, where the
LoRA attaches, the pixel resolution the UNet trains at); the trainers only call it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from deradiff.models.lora import attach_lora
from deradiff.models.pipelines import load_pipeline

if TYPE_CHECKING:
    from deradiff.training.trainer import Trainer


def load_models(cfg: Any, base: str, trainer: Trainer) -> tuple[Any, list[torch.nn.Parameter]]:
    """Base pipeline on the device: frozen parts in the mixed-precision dtype, LoRA params in fp32."""
    kwargs = {k: v for k, v in (("revision", cfg.model.revision), ("variant", cfg.model.variant)) if v}
    pipe = load_pipeline(base, **kwargs)
    if cfg.model.vae:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(cfg.model.vae, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    dtype = trainer.weight_dtype
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).to(trainer.device, dtype).eval()
    pipe.unet.to(trainer.device, dtype)
    params = attach_lora(pipe.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
    return pipe, params


def training_resolution(cfg: Any, pipe: Any) -> int:
    """Pixel size the trainer encodes and samples at: `model.resolution` when set, else the UNet's native size,
    so a model trains at the size it was built for unless the config says otherwise."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return cfg.model.resolution or int(pipe.unet.config.sample_size) * vae_scale
