"""Classifier-free guidance, written once for every loop that calls a denoiser itself."""

from __future__ import annotations

from typing import Any, Callable

import torch

from deradiff.sampling.conditions import Conditions, Inputs

# A denoiser call: (latents, timestep, keyword inputs) -> prediction, or a tuple of predictions of the same
# rows (e.g. a realigned model's mixture and its reference branch).
ModelCall = Callable[[torch.Tensor, torch.Tensor, Inputs], Any]


def unet_call(unet: Any, **extra: Any) -> ModelCall:
    """Call a diffusers UNet (or a realigned wrapper) with fixed extra keyword arguments."""

    def call(x: torch.Tensor, t: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return unet(x, t, **inputs, **extra, return_dict=False)[0]

    return call


def guided(call: ModelCall, x: torch.Tensor, t: torch.Tensor, conditions: Conditions, scale: float) -> Any:
    """The guided prediction exactly as the diffusers pipelines compute it: one call on [x; x] with guidance.

    `t` is a scalar or one timestep per row of `x`. Tuple outputs are guided element by element.
    """
    if not conditions.guided:
        return call(x, t, conditions.cond)
    t = torch.cat([t, t]) if t.ndim else t
    out = call(torch.cat([x, x]), t, conditions.inputs)
    if isinstance(out, tuple):
        return tuple(_guide(o, scale) for o in out)
    return _guide(out, scale)


def _guide(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    uncond, cond = prediction.chunk(2)
    return uncond + scale * (cond - uncond)
