"""Both realignment branches in ONE forward: rows of the batch choose adapter-off or adapter-on.

DeRaDiff needs pred_ref (LoRA off) and pred_aligned (LoRA on) of the same input at every step. Two
sequential forwards read every weight twice and pay the per-layer launch/Python overhead twice; one forward
on the stacked batch [x; x] does the base-weight work once on a batch twice as large, which is what GPUs (and
the overhead-bound tiny models on CPU) are good at. Memory: still one set of weights; activations scale with
the stacked batch (see docs/benchmarks.md for the measured trade-off).

The per-row adapter choice reuses peft's mixed-adapter-batch inference: every LoRA layer accepts an
`adapter_names` kwarg (one name per row, "__base__" = no adapter) and routes rows through its
`_mixed_batch_forward`. peft injects that kwarg with forward pre-hooks (`LoraModel._enable_peft_forward_hooks`);
a diffusers UNet is not a PeftModel, so `adapter_rows` registers the same kind of pre-hook on the LoRA layers
for the duration of one call. No LoRA math is re-implemented here.

When it cannot be done exactly, callers fall back to two calls (`BranchBatcher.reason` says why):
- no LoRA layers (e.g. two-model mode), or a tuner layer peft cannot mix per row (not a LoRA Linear/Conv/
  Embedding, merged weights, DoRA or another LoRA variant, several active adapters in one layer);
- dropout with p > 0 in training mode (the masks would be drawn differently from two calls);
- gradient checkpointing with grad enabled (the recomputation would run after the hooks are gone);
- an argument holding tensors whose rows we do not know how to stack (see `PER_SAMPLE_ARGS`);
- a layer that sees a batch dimension other than the model's (peft raises; remembered, then two calls).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

BASE = "__base__"  # peft's adapter name for "no adapter on this row"

# Model arguments whose tensors carry one row per sample (first dim == batch): stacked/sliced like the input.
# Anything else that holds a tensor makes a call unbatchable (we cannot know how to repeat it).
PER_SAMPLE_ARGS = frozenset({
    "sample", "hidden_states", "timestep", "encoder_hidden_states", "added_cond_kwargs", "timestep_cond",
    "class_labels", "attention_mask", "encoder_attention_mask", "down_block_additional_residuals",
    "mid_block_additional_residual", "down_intrablock_additional_residuals", "pooled_projections", "guidance",
    "controlnet_block_samples", "controlnet_single_block_samples",
})
SAMPLE_ARGS = ("sample", "hidden_states")


def _supported_layer_types() -> tuple[type, ...]:
    """The peft LoRA layer classes whose forward implements `adapter_names` via `_mixed_batch_forward`."""
    from peft.tuners.lora import layer

    names = ("Linear", "Embedding", "_ConvNd", "Conv2d", "Conv1d", "Conv3d")
    return tuple(getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), type))


class RowCall:
    """One model call with its arguments bound by name, so rows of per-sample tensors can be selected.

    `select(index)` returns kwargs for a call on rows `index` of the original batch (a row may repeat:
    [0..n) twice is the stacked [x; x]).
    """

    def __init__(self, arguments: dict[str, Any], rows: int):
        self.arguments = arguments
        self.rows = rows

    def select(self, index: torch.Tensor) -> dict[str, Any]:
        return {k: (_take(v, index, self.rows) if k in PER_SAMPLE_ARGS else v) for k, v in self.arguments.items()}


def bind_call(model: nn.Module, args: tuple, kwargs: dict) -> RowCall | None:
    """`RowCall` for `model(*args, **kwargs)`, or None when some tensor argument is not known per-sample."""
    try:
        bound = _signature(model).bind(*args, **kwargs)
    except TypeError:
        return None
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        elif kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    sample = next((arguments[k] for k in SAMPLE_ARGS if isinstance(arguments.get(k), torch.Tensor)), None)
    if sample is None or sample.ndim == 0:
        return None
    if any(_has_tensor(v) for k, v in arguments.items() if k not in PER_SAMPLE_ARGS):
        return None
    return RowCall(arguments, sample.shape[0])


def _signature(model: nn.Module) -> inspect.Signature:
    return _class_signature(type(model)) if not _forward_overridden(model) else inspect.signature(model.forward)


def _forward_overridden(model: nn.Module) -> bool:
    """True when an instance-level forward (e.g. an accelerate hook) replaced the class's."""
    return "forward" in model.__dict__


@functools.lru_cache(maxsize=None)
def _class_signature(cls: type) -> inspect.Signature:
    sig = inspect.signature(cls.forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # drop self


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return False


def _take(value: Any, index: torch.Tensor, rows: int) -> Any:
    """Rows `index` of every per-sample tensor in `value` (nested dict/list/tuple); scalars pass through."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != rows:
            return value  # a shared timestep (0-d) or a broadcast tensor
        return value.index_select(0, index.to(value.device))
    if isinstance(value, dict):
        return {k: _take(v, index, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, index, rows) for v in value)
    return value


def _inject_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple:
    """peft's own pre-hook, written out (peft keeps it private): pass `adapter_names` to the layer forward."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextlib.contextmanager
def adapter_rows(layers: Sequence[nn.Module], ref_rows: int, aligned_rows: int) -> Iterator[None]:
    """Within the block, each LoRA layer applies its active adapter only to the last `aligned_rows` rows."""
    names: dict[str, list[str]] = {}
    handles = []
    try:
        for layer in layers:
            active = _active_adapter(layer)
            if active not in names:
                names[active] = [BASE] * ref_rows + [active] * aligned_rows
            hook = functools.partial(_inject_adapter_names, adapter_names=names[active])
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _active_adapter(layer: nn.Module) -> str:
    active = list(layer.active_adapters)
    return active[0] if active else BASE


class BranchBatcher:
    """Runs the reference (adapter off) and aligned (adapter on) branches of chosen rows in one forward."""

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module]):
        self.model = model
        self.layers = list(layers)
        self.broken: str | None = None  # set when peft refused a mixed batch at run time
        self._dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]

    def reason(self) -> str | None:
        """Why the branches cannot share a forward right now (None: they can). Re-checked every call: the
        user may merge weights, switch adapters or toggle train/eval between calls."""
        if self.broken:
            return self.broken
        if not self.layers:
            return "the model has no LoRA layers"
        supported = _supported_layer_types()
        for layer in self.layers:
            why = _layer_reason(layer, supported)
            if why:
                return why
        if any(m.training for m in self._dropouts):
            return "dropout with p > 0 is active (training mode): one batch would draw different masks"
        if torch.is_grad_enabled() and getattr(self.model, "is_gradient_checkpointing", False):
            return "gradient checkpointing with grad enabled recomputes after the adapter-row hooks are gone"
        return None

    def run(self, call: RowCall, ref_rows: Sequence[int], aligned_rows: Sequence[int]) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
        """(model output, reference predictions of `ref_rows`, aligned predictions of `aligned_rows`), or None
        when peft refused the mixed batch (then `reason()` says why from now on)."""
        device = device_of(call)
        index = torch.tensor([*ref_rows, *aligned_rows], dtype=torch.long, device=device)
        try:
            with adapter_rows(self.layers, len(ref_rows), len(aligned_rows)):
                output = self.model(**call.select(index))
        except ValueError as exc:
            if "adapter_names" not in str(exc):
                raise
            self.broken = f"peft refused a mixed-adapter batch ({exc})"
            return None
        pred = output_sample(output)
        return output, pred[: len(ref_rows)], pred[len(ref_rows):]


def _layer_reason(layer: nn.Module, supported: tuple[type, ...]) -> str | None:
    if not isinstance(layer, supported):
        return f"{type(layer).__name__} layers cannot mix adapters per row"
    if getattr(layer, "merged", False):
        return "a LoRA adapter is merged into the weights"
    active = list(layer.active_adapters)
    if len(active) > 1:
        return f"several adapters are active at once ({', '.join(active)}); peft mixes one adapter per row"
    if active and (getattr(layer, "use_dora", {}).get(active[0]) or active[0] in getattr(layer, "lora_variant", {})):
        return "DoRA / LoRA variants are not supported in peft's mixed-adapter batches"
    return None


def device_of(call: RowCall) -> torch.device:
    for name in SAMPLE_ARGS:
        value = call.arguments.get(name)
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def output_sample(output: Any) -> torch.Tensor:
    """The prediction tensor inside a model output (tuple with return_dict=False, or a BaseOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output[next(iter(output.keys()))]


def replace_sample(output: Any, sample: torch.Tensor) -> Any:
    """`output` with its prediction replaced by `sample`, keeping the structure the pipeline expects."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    fields = dict(output.items())
    fields[next(iter(fields))] = sample
    return type(output)(**fields)
