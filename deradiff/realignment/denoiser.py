"""A drop-in denoiser that returns the DeRaDiff mixture of a reference and an aligned prediction.

It replaces `pipe.unet` (or `pipe.transformer`) so that *any* diffusers pipeline realigns without its
`__call__` being copied: the pipeline calls it exactly like the model, reads the same `.config`, `.dtype`,
`.device` (and any other attribute, delegated), and gets back the mixed prediction. The two predictions come
from `Branches` (`deradiff.realignment.branches`: LoRA off/on, stacked or two calls, or two models).

lam 0 and lam 1 are one plain forward of one model (bitwise the stock pipeline). A lambda *sweep* hands each
batch row its own lambda (`use_trajectories`, `deradiff.realignment.sweep.TrajectoryLambdas`).

Steps are counted from the timesteps the pipeline passes: a call at the scheduler's first timestep starts a
sampling run (step 0), so per-step lambda schedules restart with every pipeline call.

CFG is linear, so mixing the batched cond/uncond outputs here equals mixing after guidance.

It is a diffusers `ModelMixin` because the pipeline-level LoRA controls (`pipe.disable_lora()`,
`set_adapters`, `fuse_lora`, `unload_lora_weights`, ...) and `pipe.save_pretrained` skip, silently, any
component that is not one. As one they call this class: `save_pretrained` saves the real denoiser, and the
controls that would change the adapter under the two branches raise (`deradiff.unrealign(pipe)` first).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from diffusers import ModelMixin
from torch import nn

from deradiff.errors import DeradiffError
from deradiff.realignment.batched import output_sample, replace_sample
from deradiff.realignment.branches import Branches, BranchMode
from deradiff.realignment.mixing import LambdaSchedule, LambdaSpec, mix_predictions

# Called before every denoiser call with (denoiser, step_index, timestep, lam); step 0 starts a sampling run.
StepHook = Callable[["RealignedDenoiser", int, float, float], None]


class Trajectories(Protocol):
    """Per-row lambdas for a batch of trajectories (implemented by `deradiff.realignment.sweep.TrajectoryLambdas`)."""

    def at(self, step: int, timestep: float) -> list[float]: ...

    def check_length(self, num_steps: int) -> None: ...

    def predict(self, branches: Branches, lams: list[float], args: tuple, kwargs: dict) -> Any: ...


def _refusing(control: str) -> Callable[..., None]:
    """A method that refuses `control` while the pipeline is realigned."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise DeradiffError(
            f"{control} cannot change the LoRA of a realigned pipeline (its reference and aligned branches are "
            "built from it); call deradiff.unrealign(pipe) first, then deradiff.realign(pipe, ...) again"
        )

    return refuse


class RealignedDenoiser(ModelMixin):
    """Wraps a diffusers UNet/transformer; each call returns (1-l)*pred_ref + l*pred_aligned.

    branches: how the two predictions are computed ("auto", "stacked", "two-call"; see `Branches`).
    first_timestep: the scheduler's first timestep of the current run (None: unknown, count calls since
    `reset()`); a call at that timestep starts a new run.
    """

    def __init__(self, model: nn.Module, lam: LambdaSpec = 0.5, aligned_model: nn.Module | None = None,
                 branches: BranchMode = "auto", on_step: StepHook | None = None,
                 first_timestep: Callable[[], float | None] = lambda: None):
        super().__init__()
        self.model = model
        self.aligned_model = aligned_model
        self.branches = Branches(model, aligned_model, branches)
        self.schedule = LambdaSchedule(lam)
        self.on_step = on_step
        self.first_timestep = first_timestep
        self.trajectories: Trajectories | None = None
        self.last_lam: float | None = None
        self.reset()

    # --- what pipelines read (dtype and device are ModelMixin's, from the same parameters) ---------------
    @property
    def config(self) -> Any:
        return self.model.config

    def __getattr__(self, name: str) -> Any:
        # nn.Module keeps submodules/params in dicts and resolves them here; anything else is the model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    # --- diffusers' LoRA controls and saving (called through the pipeline's methods of the same names) ---
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None, **kwargs: Any) -> None:
        """Save the real denoiser, so `pipe.save_pretrained` writes what the unrealigned pipeline would."""
        if max_shard_size is not None:  # diffusers' own default applies when not given
            kwargs["max_shard_size"] = max_shard_size
        self.model.save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)

    # diffusers' controls that would change the adapter under the two branches, through the pipeline's methods
    disable_lora = _refusing("pipe.disable_lora()")
    enable_lora = _refusing("pipe.enable_lora()")
    fuse_lora = _refusing("pipe.fuse_lora()")
    unload_lora = _refusing("pipe.unload_lora_weights()")
    set_adapters = _refusing("pipe.set_adapters()")
    delete_adapters = _refusing("pipe.delete_adapters()")
    load_lora_adapter = _refusing("pipe.load_lora_weights()")
    # peft's own switches on the denoiser: off would make both branches the base, silently
    disable_adapters = _refusing("pipe.unet.disable_adapters()")
    enable_adapters = _refusing("pipe.unet.enable_adapters()")
    set_adapter = _refusing("pipe.unet.set_adapter()")
    add_adapter = _refusing("pipe.unet.add_adapter()")

    # ModelMixin defines these for itself; they belong to the real denoiser
    def enable_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        self.model.enable_gradient_checkpointing(*args, **kwargs)

    def disable_gradient_checkpointing(self) -> None:
        self.model.disable_gradient_checkpointing()

    # --- lambda and step counting ----------------------------------------------------------------------
    @property
    def lam(self) -> LambdaSpec:
        return self.schedule.spec

    @lam.setter
    def lam(self, value: LambdaSpec) -> None:
        self.schedule = LambdaSchedule(value)  # validates before replacing

    def reset(self) -> None:
        """Start a new sampling run: the next call is step 0."""
        self._step = 0

    def check_length(self, num_steps: int) -> None:
        """Refuse per-step lambda lists whose length is not the sampler's number of steps."""
        if self.trajectories is not None:
            self.trajectories.check_length(num_steps)
        else:
            self.schedule.check_length(num_steps)

    @contextlib.contextmanager
    def use_trajectories(self, trajectories: Trajectories) -> Iterator[None]:
        """Within the block every batch row follows its own lambda (a sweep); outside, `lam` applies again."""
        previous, self.trajectories = self.trajectories, trajectories
        self.reset()
        try:
            yield
        finally:
            self.trajectories = previous
            self.reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        timestep = _timestep_value(args, kwargs)
        if timestep == self.first_timestep():
            self.reset()
        step = self._step
        lams = self.trajectories.at(step, timestep) if self.trajectories is not None else None
        lam = _representative(lams) if lams is not None else self.schedule.at(step, timestep)
        if self.on_step is not None:
            self.on_step(self, step, timestep, lam)
        self._step, self.last_lam = step + 1, lam
        if lams is not None:
            return self.trajectories.predict(self.branches, lams, args, kwargs)
        if lam == 0.0:
            return self.branches.reference(*args, **kwargs)
        if lam == 1.0:
            return self.branches.aligned(*args, **kwargs)
        ref, aligned = self.branches.both(*args, **kwargs)
        return replace_sample(aligned, mix_predictions(output_sample(ref), output_sample(aligned), lam))


def _representative(lams: list[float]) -> float:
    """The lambda the step hooks see for a sweep: a mixing one if any row mixes (checks apply), else the first."""
    return next((lam for lam in lams if lam not in (0.0, 1.0)), lams[0])


def _timestep_value(args: tuple, kwargs: dict) -> float:
    """The call's timestep as a float (UNets take it second, transformers as `timestep=`)."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise TypeError("RealignedDenoiser: the wrapped model was called without a timestep")
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return float(t)
