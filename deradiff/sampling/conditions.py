"""What the denoiser is conditioned on, per pipeline family (SD, SDXL; SD3/FLUX slot in as further families).

Every stage that runs its own denoising loop (DDPO and reward-gradient rollouts, the eval, tune) encodes prompts
here, so a family is supported everywhere once it is supported here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from deradiff.models.family import is_sdxl

Inputs = dict[str, Any]  # denoiser keyword inputs; tensors have one row per sample (nested dicts allowed)


@dataclass
class Conditions:
    """Keyword inputs of the denoiser for a batch of prompts and, with classifier-free guidance, the negatives'."""

    cond: Inputs
    uncond: Inputs | None = None

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @functools.cached_property
    def inputs(self) -> Inputs:
        """The rows one denoiser call sees: [uncond; cond] with guidance (as diffusers batches them), else cond.
        Built once: every step of a loop calls the denoiser with the same conditions."""
        if self.uncond is None:
            return self.cond
        return _zip(lambda u, c: torch.cat([u, c]), self.uncond, self.cond)

    def rows(self, index: torch.Tensor) -> "Conditions":
        """The conditions of some samples (e.g. a PPO micro-batch)."""
        return self.map(lambda x: x[index])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditions":
        """Apply `fn` to every tensor (e.g. a dtype cast)."""
        return Conditions(_apply(fn, self.cond), None if self.uncond is None else _apply(fn, self.uncond))

    @staticmethod
    def cat(parts: Sequence["Conditions"]) -> "Conditions":
        """The conditions of several batches, one after the other."""
        uncond = None if parts[0].uncond is None else _cat([p.uncond for p in parts])
        return Conditions(_cat([p.cond for p in parts]), uncond)


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Inputs) -> Inputs:
    return {k: _apply(fn, v) if isinstance(v, dict) else fn(v) for k, v in inputs.items()}


def _zip(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: Inputs, b: Inputs) -> Inputs:
    return {k: _zip(fn, v, b[k]) if isinstance(v, dict) else fn(v, b[k]) for k, v in a.items()}


def _cat(items: Sequence[Inputs]) -> Inputs:
    return {k: _cat([i[k] for i in items]) if isinstance(v, dict) else torch.cat([i[k] for i in items])
            for k, v in items[0].items()}


def encode(pipe: Any, prompts: Sequence[str], guidance_scale: float, size: tuple[int, int],
           device: torch.device | str, negative_prompt: str | None = None) -> Conditions:
    """Encode prompts with the pipeline's own text encoders; guidance is on when the scale is > 1 (diffusers' rule).

    size: (height, width) of the generated images in pixels (SDXL conditions on it).
    """
    cfg = guidance_scale > 1.0
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    if is_sdxl(pipe):
        return _sdxl(pipe, list(prompts), cfg, size, device, negative)
    cond, uncond = pipe.encode_prompt(list(prompts), device, 1, cfg, negative)
    return Conditions({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond} if cfg else None)


def _sdxl(pipe: Any, prompts: list[str], cfg: bool, size: tuple[int, int], device: Any,
          negative: list[str] | None) -> Conditions:
    """SDXL also conditions on pooled text embeddings and (size, crop, target) time ids."""
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompts, device=device, do_classifier_free_guidance=cfg, negative_prompt=negative)
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    ).to(device).repeat(len(prompts), 1)

    def inputs(hidden: torch.Tensor, text: torch.Tensor) -> Inputs:
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids}}

    return Conditions(inputs(cond, pooled), inputs(uncond, uncond_pooled) if cfg else None)
