"""The two branches realignment mixes: the reference (LoRA off) and the aligned (LoRA on) prediction.

One model carrying a peft LoRA adapter: reference = adapters disabled, aligned = the model as the user set it
(active adapters and their weights); one set of weights in memory. Both branches of a call can run as ONE
stacked forward (rows choose adapter-off or adapter-on, `deradiff.realignment.batched`) or as two calls:

- "stacked": one forward wherever peft can do it exactly (else two calls, `fallback_reason()` says why);
- "two-call": always two sequential forwards (half the activation memory);
- "auto": stacked only when that adds at most `AUTO_STACK_ROWS` rows to the call (one image with its CFG
  pair), two calls beyond; why this rule: docs/benchmarks.md ("Stacked or two calls").

Two models (a separately fine-tuned aligned denoiser) always run two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch import nn

from deradiff.errors import DeradiffError
from deradiff.models.lora import adapter_disabled, lora_layers
from deradiff.realignment.batched import BranchBatcher, RowCall, bind_call, device_of, output_sample, replace_sample

BranchMode = Literal["auto", "stacked", "two-call"]
BRANCH_MODES: tuple[str, ...] = get_args(BranchMode)
AUTO_STACK_ROWS = 2  # "auto" stacks calls that grow by at most this many rows: one image + its CFG pair


def check_mode(mode: object) -> BranchMode:
    if mode not in BRANCH_MODES:
        raise DeradiffError(f"branches must be one of {', '.join(BRANCH_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


class Branches:
    """Reference and aligned predictions of `model` (LoRA mode) or of `model` and `aligned_model` (two models)."""

    def __init__(self, model: nn.Module, aligned_model: nn.Module | None = None, mode: BranchMode = "auto"):
        if aligned_model is not None:
            _check_compatible(model, aligned_model)
            aligned_model.to(device=model.device, dtype=model.dtype)
        self.model = model
        self.aligned_model = aligned_model
        self.layers = [] if aligned_model is not None else lora_layers(model)
        if aligned_model is None and not any(not layer.disable_adapters for layer in self.layers):
            raise DeradiffError(
                f"the {type(model).__name__} has no enabled LoRA adapter to realign; load one "
                "(deradiff.models.load_lora) or pass aligned_unet= (a fine-tuned copy)"
            )
        self._batcher = BranchBatcher(model, self.layers) if aligned_model is None else None
        self.mode = mode
        self.last_path: str | None = None  # "single", "batched" or "two-call": how the last call ran

    @property
    def mode(self) -> BranchMode:
        return self._mode

    @mode.setter
    def mode(self, value: BranchMode) -> None:
        self._mode = check_mode(value)

    def fallback_reason(self) -> str | None:
        """Why both branches would run as two forwards instead of one stacked forward (None: they would not)."""
        if self._batcher is None:
            return "two-model mode: the aligned model is a separate set of weights"
        if self.mode == "two-call":
            return "branches is two-call"
        return self._batcher.reason()

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        self.last_path = "single"
        if self.aligned_model is not None:
            return self.model(*args, **kwargs)
        with adapter_disabled(self.model, self.layers):
            return self.model(*args, **kwargs)

    def aligned(self, *args: Any, **kwargs: Any) -> Any:
        self.last_path = "single"
        return (self.aligned_model or self.model)(*args, **kwargs)

    def both(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """(reference output, aligned output) of one call: one stacked forward when possible, else two calls."""
        call = self._stackable(args, kwargs, stacked_rows=lambda rows: 2 * rows)
        if call is not None:
            rows = range(call.rows)
            result = self._batcher.run(call, rows, rows)
            if result is not None:
                output, ref, aligned = result
                self.last_path = "batched"
                return replace_sample(output, ref), replace_sample(output, aligned)
        ref, aligned = self.reference(*args, **kwargs), self.aligned(*args, **kwargs)
        self.last_path = "two-call"
        return ref, aligned

    def rows(self, args: tuple, kwargs: dict, ref_rows: list[int],
             aligned_rows: list[int]) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        """(an output to reuse as structure, reference predictions of `ref_rows`, aligned of `aligned_rows`).

        For sweeps: only the rows (and branches) that some trajectory needs are computed, in one forward when
        possible; otherwise two calls on the row subsets (or, when the call cannot be split by rows, two full
        calls from which the rows are taken).
        """
        call = self._stackable(args, kwargs, stacked_rows=lambda rows: len(ref_rows) + len(aligned_rows))
        if call is not None:
            result = self._batcher.run(call, ref_rows, aligned_rows)
            if result is not None:
                self.last_path = "batched"
                return result
        call = call or bind_call(self.model, args, kwargs)
        if call is None:
            ref_out, aligned_out = self.reference(*args, **kwargs), self.aligned(*args, **kwargs)
            self.last_path = "two-call"
            return aligned_out, output_sample(ref_out)[ref_rows], output_sample(aligned_out)[aligned_rows]
        ref_out = self.reference(**call.select(_index(ref_rows, call))) if ref_rows else None
        aligned_out = self.aligned(**call.select(_index(aligned_rows, call))) if aligned_rows else None
        self.last_path = "two-call"
        template = aligned_out if aligned_out is not None else ref_out
        return template, _sample_or_none(ref_out), _sample_or_none(aligned_out)

    def _stackable(self, args: tuple, kwargs: dict, stacked_rows: Callable[[int], int]) -> RowCall | None:
        """The call bound by rows when it may run stacked; `stacked_rows(call.rows)`: rows the stacked
        forward would have ("auto" stacks only when that adds at most AUTO_STACK_ROWS rows to the call's)."""
        if self.fallback_reason() is not None:
            return None
        call = bind_call(self.model, args, kwargs)
        if call is not None and self.mode == "auto" and stacked_rows(call.rows) - call.rows > AUTO_STACK_ROWS:
            return None
        return call


def _check_compatible(model: nn.Module, aligned: nn.Module) -> None:
    if type(model) is not type(aligned):
        raise DeradiffError(f"aligned_unet is a {type(aligned).__name__} but the pipeline's is a {type(model).__name__}")
    for key in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "block_out_channels"):
        a, b = getattr(model.config, key, None), getattr(aligned.config, key, None)
        if a != b:
            raise DeradiffError(f"aligned_unet does not match the pipeline's model: config {key} is {b!r}, expected {a!r}")


def _index(rows: list[int], call: RowCall) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device_of(call))


def _sample_or_none(output: Any) -> torch.Tensor | None:
    return None if output is None else output_sample(output)
