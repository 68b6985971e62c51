"""A drop-in denoiser that returns the DeRaDiff mixture of a reference and an aligned prediction.

It replaces `pipe.unet` (or `pipe.transformer`) so that *any* diffusers pipeline realigns without its
`__call__` being copied: the pipeline calls it exactly like the model, reads the same `.config`, `.dtype`,
`.device` (and any other attribute, delegated), and gets back the mixed prediction.

Two ways to get the two predictions:
- one model carrying a peft LoRA adapter: reference = adapters disabled, aligned = the model as the user set
  it (active adapters and their weights). One set of weights in memory, and by default ONE forward per step:
  the batch is stacked [x; x] and the LoRA layers apply the adapter to the second half only
  (`deradiff.realign.batched`); where that cannot be exact it falls back to two calls (`fallback_reason()`).
- two models: `model` (reference) and `aligned_model` (e.g. a fully fine-tuned UNet): always two calls.

lam 0 and lam 1 are one plain forward of one model (bitwise the stock pipeline). A lambda *sweep* sets
per-trajectory lambdas (`use_trajectories`, see `deradiff.realign.sweep`): each batch row then gets its own.

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
from deradiff.realign.batched import BranchBatcher, RowCall, bind_call, device_of, output_sample, replace_sample
from deradiff.realign.mixing import LambdaSchedule, LambdaSpec, mix_predictions

# Called before every denoiser call with (denoiser, step_index, timestep, lam); step 0 starts a sampling run.
StepHook = Callable[["RealignedDenoiser", int, float, float], None]


class Trajectories(Protocol):
    """Per-row lambdas for a batch of trajectories (implemented by `deradiff.realign.sweep.TrajectoryLambdas`)."""

    def at(self, step: int, timestep: float) -> list[float]: ...

    def check_length(self, num_steps: int) -> None: ...

    def predict(self, denoiser: "RealignedDenoiser", lams: list[float], args: tuple, kwargs: dict) -> Any: ...


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


AUTO_STACK_ROWS = 2  # batch_branches=None stacks calls of at most this many rows: one image + its CFG pair
BRANCH_MODES: dict[str, bool | None] = {"auto": None, "stacked": True, "two-call": False}  # config name -> batch_branches


class _Keep:
    """Default of `batch_branches` arguments (`realign`, `sweep`): keep the current setting; a new
    realignment starts at None (auto)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


def _refuse_while_realigned(control: str) -> DeradiffError:
    return DeradiffError(
        f"{control} cannot change the LoRA of a realigned pipeline (its reference and aligned branches are built "
        "from it); call deradiff.unrealign(pipe) first, then deradiff.realign(pipe, ...) again"
    )


class RealignedDenoiser(ModelMixin):
    """Wraps a diffusers UNet/transformer; each call returns (1-l)*pred_ref + l*pred_aligned.

    batch_branches: True evaluates both branches in one stacked forward wherever peft can do it exactly;
    False always runs two sequential calls; None (default) stacks only when that adds at most
    `AUTO_STACK_ROWS` rows to the call (one image with its CFG pair; a sweep whose rows are mostly at
    lambda 0 or 1 adds fewer). Why: stacking grows the activations of the forward. At SD1.5 size (512 px)
    two rows of activations are ~8% of the weights, so stacking one image stays within a 10% memory budget
    (measured 1.07x of plain sampling) while saving the per-layer overhead of a second call (tiny model:
    1.64x instead of 2.05x of plain); at more rows the activations grow past that budget (8 images: an
    estimated 1.4x) and the forward is compute-bound, where two calls were as fast or faster (measured on
    CPU; docs/benchmarks.md). The rule counts rows, not bytes: at larger resolutions (SDXL at 1024 px) two
    extra rows weigh more, and `batch_branches=False` is the memory-safe choice.
    The stacked batch is mathematically the two-call rule but not always bitwise equal to it: e.g. MKL's
    sgemm uses another kernel below 4 rows (the per-sample time-embedding Linears see 2 rows with CFG, 4
    when stacked), a ~1e-7 relative rounding difference.
    """

    def __init__(self, model: nn.Module, lam: LambdaSpec = 0.5, aligned_model: nn.Module | None = None,
                 on_step: StepHook | None = None, batch_branches: bool | None = None):
        super().__init__()
        self.model = model
        self.aligned_model = aligned_model
        self._lora_layers = [] if aligned_model is not None else lora_layers(model)
        if aligned_model is None and not any(not layer.disable_adapters for layer in self._lora_layers):
            raise DeradiffError(
                f"the {type(model).__name__} has no enabled LoRA adapter to realign; load one "
                "(deradiff.models.load_lora) or pass aligned_unet= (a fine-tuned copy)"
            )
        self._batcher = BranchBatcher(model, self._lora_layers) if aligned_model is None else None
        self.batch_branches = batch_branches
        self.schedule = LambdaSchedule(lam)
        self.on_step = on_step
        self.trajectories: Trajectories | None = None
        self.last_lam: float | None = None
        self.last_path: str | None = None  # "single", "batched" or "two-call": how the last call ran
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

    # --- diffusers' LoRA controls and saving (called through the pipeline's methods of the same names) ---
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        variant: str | None = None, max_shard_size: int | str | None = None, **kwargs: Any) -> None:
        """Save the real denoiser, so `pipe.save_pretrained` writes what the unrealigned pipeline would."""
        if max_shard_size is not None:  # diffusers' own default applies when not given
            kwargs["max_shard_size"] = max_shard_size
        self.model.save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)

    def disable_lora(self) -> None:
        raise _refuse_while_realigned("pipe.disable_lora()")

    def enable_lora(self) -> None:
        raise _refuse_while_realigned("pipe.enable_lora()")

    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse_while_realigned("pipe.fuse_lora()")

    def unload_lora(self) -> None:
        raise _refuse_while_realigned("pipe.unload_lora_weights()")

    def set_adapters(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse_while_realigned("pipe.set_adapters()")

    def delete_adapters(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse_while_realigned("pipe.delete_adapters()")

    def load_lora_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse_while_realigned("pipe.load_lora_weights()")

    # peft's own switches on the denoiser: off would make both branches the base, silently
    def disable_adapters(self) -> None:
        raise _refuse_while_realigned("pipe.unet.disable_adapters()")

    def enable_adapters(self) -> None:
        raise _refuse_while_realigned("pipe.unet.enable_adapters()")

    def set_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse_while_realigned("pipe.unet.set_adapter()")

    def add_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise _refuse_while_realigned("pipe.unet.add_adapter()")

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
        """Start a new sampling run: the next call is step 0 (called from the scheduler's set_timesteps)."""
        self._step = 0
        self._last_t: float | None = None

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

    def fallback_reason(self) -> str | None:
        """Why mixing steps would run two forwards instead of one stacked forward (None: they would not)."""
        if self._batcher is None:
            return "two-model mode: the aligned model is a separate set of weights"
        if self.batch_branches is False:
            return "batch_branches is off"
        return self._batcher.reason()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        timestep = _timestep_value(args, kwargs)
        if self._last_t is not None and timestep > self._last_t:
            self.reset()  # fallback when nobody called reset(): timesteps only decrease within one run
        step = self._step
        lams = self.trajectories.at(step, timestep) if self.trajectories is not None else None
        lam = _representative(lams) if lams is not None else self.schedule.at(step, timestep)
        if self.on_step is not None:
            self.on_step(self, step, timestep, lam)
        self._step, self._last_t, self.last_lam = step + 1, timestep, lam
        if lams is not None:
            return self.trajectories.predict(self, lams, args, kwargs)
        if lam in (0.0, 1.0):
            self.last_path = "single"
            return self.predict_reference(*args, **kwargs) if lam == 0.0 else self.predict_aligned(*args, **kwargs)
        ref, aligned = self.predict_both(*args, **kwargs)
        return replace_sample(aligned, mix_predictions(output_sample(ref), output_sample(aligned), lam))

    # --- the two branches ------------------------------------------------------------------------------
    def predict_reference(self, *args: Any, **kwargs: Any) -> Any:
        if self.aligned_model is not None:
            return self.model(*args, **kwargs)
        with adapters_disabled(self._lora_layers):
            return self.model(*args, **kwargs)

    def predict_aligned(self, *args: Any, **kwargs: Any) -> Any:
        model = self.aligned_model if self.aligned_model is not None else self.model
        return model(*args, **kwargs)

    def predict_both(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """(reference output, aligned output): one stacked forward when possible, else two calls."""
        call = self._batchable_call(args, kwargs, stacked_rows=lambda rows: 2 * rows)
        if call is not None:
            rows = range(call.rows)
            result = self._batcher.run(call, rows, rows)
            if result is not None:
                output, ref, aligned = result
                self.last_path = "batched"
                return replace_sample(output, ref), replace_sample(output, aligned)
        self.last_path = "two-call"
        return self.predict_reference(*args, **kwargs), self.predict_aligned(*args, **kwargs)

    def predict_rows(self, args: tuple, kwargs: dict, ref_rows: list[int],
                     aligned_rows: list[int]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(an output to reuse as structure, reference predictions of `ref_rows`, aligned of `aligned_rows`).

        For sweeps: only the rows (and branches) that some trajectory needs are computed, in one forward when
        possible; otherwise two calls on the row subsets (or, when the call cannot be split by rows, two full
        calls from which the rows are taken).
        """
        call = self._batchable_call(args, kwargs, stacked_rows=lambda rows: len(ref_rows) + len(aligned_rows))
        if call is not None:
            result = self._batcher.run(call, ref_rows, aligned_rows)
            if result is not None:
                self.last_path = "batched"
                return result
        self.last_path = "two-call"
        call = call or bind_call(self.model, args, kwargs)
        if call is None:
            ref_out, aligned_out = self.predict_reference(*args, **kwargs), self.predict_aligned(*args, **kwargs)
            return aligned_out, output_sample(ref_out)[ref_rows], output_sample(aligned_out)[aligned_rows]
        ref_out = self.predict_reference(**call.select(_index(ref_rows, call))) if ref_rows else None
        aligned_out = self.predict_aligned(**call.select(_index(aligned_rows, call))) if aligned_rows else None
        template = aligned_out if aligned_out is not None else ref_out
        return template, _sample_or_none(ref_out), _sample_or_none(aligned_out)

    def _batchable_call(self, args: tuple, kwargs: dict, stacked_rows: Callable[[int], int]) -> RowCall | None:
        """The call bound by rows when it may run stacked; `stacked_rows(call.rows)`: rows the stacked
        forward would have (auto stacks only when that adds at most AUTO_STACK_ROWS rows to the call's)."""
        if self.fallback_reason() is not None:
            return None
        call = bind_call(self.model, args, kwargs)
        if call is not None and self.batch_branches is None and stacked_rows(call.rows) - call.rows > AUTO_STACK_ROWS:
            return None  # the default policy (see the class docstring)
        return call


def _representative(lams: list[float]) -> float:
    """The lambda the step hooks see for a sweep: a mixing one if any row mixes (checks apply), else the first."""
    return next((lam for lam in lams if lam not in (0.0, 1.0)), lams[0])


def _index(rows: list[int], call: RowCall) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device_of(call))


def _sample_or_none(output: Any) -> torch.Tensor | None:
    return None if output is None else output_sample(output)


def _timestep_value(args: tuple, kwargs: dict) -> float:
    """The call's timestep as a float (UNets take it second, transformers as `timestep=`)."""
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    if t is None:
        raise TypeError("RealignedDenoiser: the wrapped model was called without a timestep")
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0])
    return float(t)
