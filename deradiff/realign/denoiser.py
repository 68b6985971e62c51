"""A drop-in denoiser that returns the DeRaDiff mixture of a reference and an aligned prediction.

It replaces `pipe.unet` (or `pipe.transformer`) so that *any* diffusers pipeline realigns without its
`__call__` being copied: the pipeline calls it exactly like the model, reads the same `.config`, `.dtype`,
`.device` (and any other attribute, delegated), and gets back the mixed prediction.

Two ways to get the two predictions:
- one model carrying a peft LoRA adapter: reference = adapters disabled, aligned = the model as the user set
  it (active adapters and their weights). One set of weights in memory.
- two models: `model` (reference) and `aligned_model` (e.g. a fully fine-tuned UNet).

CFG is linear, so mixing the batched cond/uncond outputs here equals mixing after guidance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from deradiff.errors import DeradiffError
from deradiff.realign.mixing import LambdaSchedule, LambdaSpec, mix_predictions

# Called before every denoiser call with (denoiser, step_index, timestep, lam); step 0 starts a sampling run.
StepHook = Callable[["RealignedDenoiser", int, float, float], None]


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft tuner layers in `model` (empty when it carries no adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """Run with every adapter off, then restore each layer's on/off state *and* its requires_grad flags.

    peft's `enable_adapters` flips requires_grad as a side effect; restoring them keeps realignment invisible
    to a training loop that shares the model.
    """
    states = [(layer, layer.disable_adapters) for layer in layers]
    grads = [(p, p.requires_grad) for layer in layers for p in _adapter_parameters(layer)]
    try:
        for layer, _ in states:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, was_disabled in states:
            layer.enable_adapters(not was_disabled)
        for param, flag in grads:
            param.requires_grad_(flag)


def _adapter_parameters(layer: nn.Module) -> Iterator[nn.Parameter]:
    for name in layer.adapter_layer_names:
        yield from getattr(layer, name).parameters()


class RealignedDenoiser(nn.Module):
    """Wraps a diffusers UNet/transformer; each call returns (1-l)*pred_ref + l*pred_aligned."""

    def __init__(self, model: nn.Module, lam: LambdaSpec = 0.5, aligned_model: nn.Module | None = None,
                 on_step: StepHook | None = None):
        super().__init__()
        self.model = model
        self.aligned_model = aligned_model
        self._lora_layers = [] if aligned_model is not None else lora_layers(model)
        if aligned_model is None and not any(not layer.disable_adapters for layer in self._lora_layers):
            raise DeradiffError(
                f"the {type(model).__name__} has no enabled LoRA adapter to realign; load one "
                "(deradiff.models.load_lora) or pass aligned_unet= (a fine-tuned copy)"
            )
        self.schedule = LambdaSchedule(lam)
        self.on_step = on_step
        self.last_lam: float | None = None
        self.reset()

    # --- what pipelines read ---------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __getattr__(self, name: str) -> Any:
        # nn.Module keeps submodules/params in dicts and resolves them here; anything else is the model's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    # --- lambda and step counting ----------------------------------------------------------------------
    @property
    def lam(self) -> LambdaSpec:
        return self.schedule.spec

    @lam.setter
    def lam(self, value: LambdaSpec) -> None:
        self.schedule = LambdaSchedule(value)  # validates before replacing

    def reset(self) -> None:
        """Start a new sampling run: the next call is step 0 (called from the scheduler's set_timesteps)."""
        self._step = 0
        self._last_t: float | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        timestep = _timestep_value(args, kwargs)
        if self._last_t is not None and timestep > self._last_t:
            self.reset()  # fallback when nobody called reset(): timesteps only decrease within one run
        step = self._step
        lam = self.schedule.at(step, timestep)
        if self.on_step is not None:
            self.on_step(self, step, timestep, lam)
        self._step, self._last_t, self.last_lam = step + 1, timestep, lam
        if lam == 0.0:
            return self.predict_reference(*args, **kwargs)
        if lam == 1.0:
            return self.predict_aligned(*args, **kwargs)
        ref, aligned = self.predict_both(*args, **kwargs)
        return _replace_sample(aligned, mix_predictions(_sample(ref), _sample(aligned), lam))

    def predict_reference(self, *args: Any, **kwargs: Any) -> Any:
        if self.aligned_model is not None:
            return self.model(*args, **kwargs)
        with adapters_disabled(self._lora_layers):
            return self.model(*args, **kwargs)

    def predict_aligned(self, *args: Any, **kwargs: Any) -> Any:
        model = self.aligned_model if self.aligned_model is not None else self.model
        return model(*args, **kwargs)

    def predict_both(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """(reference output, aligned output). Two forwards; the place for a batched single forward later."""
        return self.predict_reference(*args, **kwargs), self.predict_aligned(*args, **kwargs)


def _timestep_value(args: tuple, kwargs: dict) -> float:
    """The call's timestep as a float (UNets take it second, transformers as `timestep=`)."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise TypeError("RealignedDenoiser: the wrapped model was called without a timestep")
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return float(t)


def _sample(output: Any) -> torch.Tensor:
    """The prediction tensor inside a model output (tuple with return_dict=False, or a BaseOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output[next(iter(output.keys()))]


def _replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` with its prediction replaced by `sample`, keeping the structure the pipeline expects."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    fields = dict(output.items())
    fields[next(iter(fields))] = sample
    return type(output)(**fields)
