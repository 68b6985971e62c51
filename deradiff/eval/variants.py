"""The models one evaluation compares, and how each one's denoiser is called.

kind = base | retrained | realigned | weight_scaled. Every variant is a LoRA pipeline plus a way of calling its
UNet; the base prediction (needed for the path KL) is always the same UNet with its adapter switched off, so
the reference is bit-identical to the base model for every variant.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from deradiff.models.lora import adapter_disabled
from deradiff.realignment.mixing import effective_beta, mix_predictions
from deradiff.sampling.guidance import ModelCall, unet_call

KINDS = ("base", "retrained", "realigned", "weight_scaled")


@dataclass(frozen=True)
class Variant:
    """One evaluated model. `lora` names the LoRA (folder) it runs from; `lam` is None unless realigned/scaled."""

    name: str
    kind: str
    lora: str
    method: str
    beta: float | None
    lam: float | None = None
    anchor: bool = False

    @property
    def effective_beta(self) -> float:
        """The KL strength this model behaves like: beta, beta0/lam for realigned/scaled, inf for base."""
        if self.kind == "base":
            return math.inf
        if self.lam is None:
            return float(self.beta)
        return effective_beta(self.beta, self.lam)

    def tracker_config(self) -> dict[str, Any]:
        """The consistent per-run config keys every eval run logs (W&B grouping and filtering)."""
        eff = self.effective_beta
        return {"name": self.name, "kind": self.kind, "method": self.method, "beta": self.beta,
                "lambda": self.lam, "effective_beta": None if math.isinf(eff) else eff, "anchor": self.anchor}


@dataclass
class TimedCall:
    """Wraps a UNet call and accumulates its wall time (compute accounting counts only the model's calls)."""

    call: ModelCall
    seconds: float = field(default=0.0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> Any:
        start = time.perf_counter()
        try:
            return self.call(x, t, inputs)
        finally:
            self.seconds += time.perf_counter() - start


def base_call(unet: Any) -> ModelCall:
    """The base model: the LoRA UNet with its adapter off for this call only."""

    def call(x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        with adapter_disabled(unet) as model:
            return model(x, t, **inputs, return_dict=False)[0]

    return call


def realigned_call(branches: Any, lam: float) -> ModelCall:
    """The realigned model at a constant `lam`: (mixture, reference prediction). The reference branch is the
    base model's prediction at the same state, so the path KL needs no extra base call."""

    def call(x: torch.Tensor, t: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        ref, aligned = branches.both(x, t, **inputs, return_dict=False)
        return mix_predictions(ref[0], aligned[0], lam), ref[0]

    return call


@contextlib.contextmanager
def model_call(pipe: Any, variant: Variant, branches: str = "auto") -> Iterator[tuple[ModelCall, ModelCall | None]]:
    """(model call, base call or None for the base itself) for `variant` on a pipeline carrying its LoRA.
    `branches`: how a realigned model runs its two branches ("auto", "stacked" or "two-call")."""
    unet = pipe.unet
    if variant.kind == "base":
        yield base_call(unet), None
    elif variant.kind == "retrained" or (variant.kind == "realigned" and variant.lam == 1.0):
        yield unet_call(unet), base_call(unet)
    elif variant.kind == "weight_scaled":
        yield unet_call(unet, cross_attention_kwargs={"scale": float(variant.lam)}), base_call(unet)
    elif variant.kind == "realigned" and variant.lam == 0.0:
        yield base_call(unet), None  # the base model itself
    elif variant.kind == "realigned":
        from deradiff.realignment.branches import Branches

        yield realigned_call(Branches(unet, mode=branches), variant.lam), base_call(unet)
    else:
        raise ValueError(f"unknown variant kind '{variant.kind}' (expected one of {KINDS})")
