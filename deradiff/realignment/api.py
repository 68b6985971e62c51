"""`deradiff.realign(pipe, lam)`: make any diffusers pipeline sample at KL strength beta/lam.

    handle = deradiff.realign(pipe, lam=0.5)     # pipe.unet now returns the DeRaDiff mixture
    images = pipe(prompt, generator=torch.Generator().manual_seed(0)).images
    handle.lam = 2.0                              # or deradiff.realign(pipe, lam=2.0) again; no reload
    deradiff.unrealign(pipe)                      # or handle.undo(): the original pipeline, exactly

The pipeline's denoiser (`unet`, or `transformer`) is swapped for a `RealignedDenoiser` without touching the
pipeline's config; the denoiser counts steps from the timesteps it is called with. At step 0 of each run the
handle checks per-step schedules against the scheduler's number of steps. The one thing only the scheduler
sees is the `eta` of each step, which decides whether the mixture is exact for DDIM: so `scheduler.step` gets
an instance-level wrapper (removed on undo; diffusers has no hook for scheduler calls) that warns once for
samplers where the mixture is an approximation. `guidance_rescale > 0` is refused while mixing (0 < lam != 1):
the rescale is not linear, so mixing before it differs from mixing the two rescaled predictions the theory
asks for.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch import nn

from deradiff.errors import DeradiffError
from deradiff.models.lora import lora_layers
from deradiff.models.pipelines import loaded_lora_beta
from deradiff.realignment.branches import BranchMode, check_mode
from deradiff.realignment.denoiser import RealignedDenoiser
from deradiff.realignment.mixing import LambdaSpec, effective_beta
from deradiff.realignment.schedulers import (
    ApproximateSamplerWarning,
    approximation_message,
    hook_scheduler,
    is_exact,
    is_hooked,
    step_eta,
    unhook_scheduler,
)

DENOISER_NAMES = ("unet", "transformer")
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")


class RealignHandle:
    """The live realignment of one pipeline: change `lam`/`beta` at will, `undo()` to restore."""

    def __init__(self, pipe: Any, component: str, original: nn.Module, beta: float | None):
        self.pipe = pipe
        self.component = component
        self.original = original
        self.beta = beta
        self.denoiser: RealignedDenoiser | None = None
        self._schedulers: list[Any] = []
        self._warned: set[tuple[str, bool]] = set()

    @property
    def active(self) -> bool:
        return self.denoiser is not None

    @property
    def lam(self) -> LambdaSpec:
        return self._live().lam

    @lam.setter
    def lam(self, value: LambdaSpec) -> None:
        self._live().lam = value

    @property
    def effective_beta(self) -> float | None:
        """beta / lam for a constant lam with known beta (inf at lam 0); None otherwise."""
        lam = self._live().schedule.constant
        return None if lam is None else effective_beta(self.beta, lam)

    def undo(self) -> None:
        """Put the original denoiser back and remove the scheduler hooks; a second call does nothing."""
        if self.denoiser is None:
            return
        object.__setattr__(self.pipe, self.component, self.original)  # bypass config re-registration
        for scheduler in self._schedulers:
            unhook_scheduler(scheduler)
        self._schedulers.clear()
        self.denoiser = None

    def _live(self) -> RealignedDenoiser:
        if self.denoiser is None:
            raise DeradiffError("this realignment was undone; call deradiff.realign(pipe, lam=...) again")
        return self.denoiser

    def _install(self, denoiser: RealignedDenoiser) -> None:
        self.denoiser = denoiser
        denoiser.handle = self
        object.__setattr__(self.pipe, self.component, denoiser)
        self._hook(self.pipe.scheduler)

    def _hook(self, scheduler: Any) -> None:
        hook_scheduler(scheduler, on_step=self._on_scheduler_step)
        self._schedulers.append(scheduler)

    def first_timestep(self) -> float | None:
        """The timestep a sampling run of the pipeline's scheduler starts at (img2img starts at its begin index)."""
        scheduler = self.pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        begin = getattr(scheduler, "begin_index", None) or 0
        return float(timesteps[begin]) if timesteps is not None and len(timesteps) > begin else None

    # --- hooks -----------------------------------------------------------------------------------------
    def _on_step(self, denoiser: RealignedDenoiser, step: int, timestep: float, lam: float) -> None:
        """Before each denoiser call: per-run checks at step 0, the guidance_rescale refusal when mixing."""
        scheduler = self.pipe.scheduler
        if step == 0:
            if not is_hooked(scheduler):  # the user swapped schedulers after realign()
                self._hook(scheduler)
            denoiser.check_length(_num_steps(scheduler))
        if lam not in (0.0, 1.0) and _guidance_rescale(self.pipe) > 0:
            raise DeradiffError(
                f"guidance_rescale={_guidance_rescale(self.pipe):g} cannot be combined with realignment "
                f"(lambda={lam:g}): the rescale is not linear; call the pipeline with guidance_rescale=0"
            )

    def _on_scheduler_step(self, scheduler: Any, args: tuple, kwargs: dict) -> None:
        """Warn once per (sampler, eta==0) when the step about to run makes the mixture approximate."""
        lam = self.denoiser.last_lam if self.denoiser is not None else None
        if lam is None or lam in (0.0, 1.0):
            return
        eta = step_eta(scheduler, args, kwargs)
        if is_exact(scheduler, eta):
            return
        key = (type(scheduler).__name__, eta == 0)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(approximation_message(scheduler, eta), ApproximateSamplerWarning, stacklevel=3)


def realign(pipe: Any, lam: LambdaSpec = 0.5, aligned_unet: nn.Module | None = None,
            beta: float | None = None, branches: BranchMode | None = None) -> RealignHandle:
    """Realign `pipe` to strength beta/lam; calling it again on the same pipe just updates lam (and beta).

    lam: a float >= 0, a list with one value per denoising step, or `fn(step_index, timestep) -> float`.
    aligned_unet: a separately fine-tuned denoiser (two-model mode); otherwise the pipeline's UNet must carry
    a peft LoRA adapter (reference = adapter off). beta: the KL strength the aligned model was trained at
    (default: from the LoRA's deradiff metadata when it was loaded with deradiff.models.load_lora).
    branches: "stacked" = adapter-off and adapter-on branches in one stacked forward per step (LoRA mode),
    "two-call" = two calls (half the activation memory), "auto" = stacked for one image with CFG (2 rows), two
    calls for larger batches (see `deradiff.realignment.branches`). None: "auto" for a new realignment, the
    current setting when the pipe is already realigned.
    """
    _check_beta(beta)
    if branches is not None:
        check_mode(branches)
    handle = realignment(pipe)
    if handle is not None:
        if aligned_unet is None or aligned_unet is handle.denoiser.aligned_model:
            handle.lam = lam
            handle.beta = beta if beta is not None else handle.beta
            if branches is not None:
                handle.denoiser.branches.mode = branches
            return handle
        handle.undo()
    _check_text_encoders(pipe)
    component = _denoiser_component(pipe)
    model = getattr(pipe, component)
    handle = RealignHandle(pipe, component, model, beta if beta is not None else loaded_lora_beta(pipe))
    denoiser = RealignedDenoiser(model, lam, aligned_model=aligned_unet, branches=branches or "auto",
                                 on_step=handle._on_step, first_timestep=handle.first_timestep)
    denoiser.training = model.training
    handle._install(denoiser)
    return handle


def realignment(pipe: Any) -> RealignHandle | None:
    """The live realignment of `pipe` (None when it is not realigned)."""
    denoiser = next((getattr(pipe, name, None) for name in DENOISER_NAMES if hasattr(pipe, name)), None)
    return denoiser.handle if isinstance(denoiser, RealignedDenoiser) else None


def unrealign(pipe: Any) -> bool:
    """Undo `realign(pipe)`; returns False when the pipeline was not realigned."""
    handle = realignment(pipe)
    if handle is None:
        return False
    handle.undo()
    return True


def _denoiser_component(pipe: Any) -> str:
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), nn.Module):
            return name
    raise DeradiffError(f"{type(pipe).__name__} has no unet or transformer to realign")


def _check_text_encoders(pipe: Any) -> None:
    """Refuse an active text-encoder adapter: the pipeline encodes the prompt once and both branches use that
    encoding, so the reference would keep the adapter and lambda 0 would not be the base model."""
    for name in TEXT_ENCODER_NAMES:
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, nn.Module) and any(not layer.disable_adapters for layer in lora_layers(encoder)):
            raise DeradiffError(
                f"pipe.{name} carries an active LoRA adapter; deradiff realigns UNet-only LoRAs (both branches share "
                f"one prompt encoding, so lambda 0 would not be the base); load a LoRA without {name} layers"
            )


def _check_beta(beta: float | None) -> None:
    """beta is a KL strength: a positive, finite number (or None: from the LoRA's metadata)."""
    valid = isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0
    if beta is not None and not valid:
        raise DeradiffError(f"beta must be a positive number (the KL strength the LoRA was trained at), got {beta!r}")


def _num_steps(scheduler: Any) -> int:
    """Denoiser calls in this run: the scheduler's timesteps past its begin index (img2img starts later)."""
    begin = getattr(scheduler, "begin_index", None) or 0
    return len(scheduler.timesteps) - begin


def _guidance_rescale(pipe: Any) -> float:
    """The pipeline call's guidance_rescale, when classifier-free guidance is on (0 otherwise)."""
    rescale = float(getattr(pipe, "_guidance_rescale", 0.0) or 0.0)
    if rescale and not getattr(pipe, "do_classifier_free_guidance", True):
        return 0.0
    return rescale
