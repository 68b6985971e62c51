"""The DeRaDiff mixing rule (arXiv 2601.20198), as small pure functions.

The KL-regularised optimum at strength beta/l is proportional to p_ref^(1-l) * p_beta^l. For a reverse step
whose two Gaussians share the variance, that product is a Gaussian with the same variance and the mean
mixed linearly, so mixing the model predictions (eps, v or flow: all affine in the mean) is the whole rule:

    pred = (1 - l) * pred_ref + l * pred_aligned

l = 0 is the base model, l = 1 the aligned one, l = 0.5 behaves like 2*beta, l = 2 like beta/2 (extrapolation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import TypeVar, Union

from deradiff.errors import DeradiffError

T = TypeVar("T")

# What users may pass as `lam`: one value, one value per denoiser call, or a function of (step, timestep).
LambdaSpec = Union[float, Sequence[float], Callable[[int, float], float]]


def check_lambda(value: object, where: str = "lambda") -> float:
    """Return `value` as a float, or raise a one-line `DeradiffError` naming it.

    Negative l would weight the reference with more than 1 and the aligned model negatively in the *other*
    direction of the KL path; the paper's family is l >= 0, so that is what we accept (l > 1 extrapolates).
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise DeradiffError(f"{where} must be a number >= 0, got {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise DeradiffError(f"{where} must be a finite number >= 0, got {number}")
    if number < 0:
        raise DeradiffError(f"{where} must be >= 0 (0 = base model, 1 = aligned model), got {number}")
    return number


def mix_predictions(pred_ref: T, pred_aligned: T, lam: float) -> T:
    """(1 - lam) * pred_ref + lam * pred_aligned; exact pass-through at lam 0 and 1 (bitwise reproducible)."""
    if lam == 0.0:
        return pred_ref
    if lam == 1.0:
        return pred_aligned
    return (1.0 - lam) * pred_ref + lam * pred_aligned  # type: ignore[operator]


class LambdaSchedule:
    """A validated lambda per denoiser call: a constant, a list indexed by step, or `fn(step, timestep)`.

    The step index counts denoiser calls within one pipeline call (one per scheduler timestep), starting at 0.
    """

    def __init__(self, spec: LambdaSpec | "LambdaSchedule"):
        if isinstance(spec, LambdaSchedule):
            spec = spec.spec
        self.spec = spec
        self.constant: float | None = None
        self.values: list[float] | None = None
        self.fn: Callable[[int, float], float] | None = None
        if callable(spec):
            self.fn = spec
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise DeradiffError("lambda schedule is an empty list; give one value per denoising step")
            self.values = [check_lambda(v, f"lambda schedule[{i}]") for i, v in enumerate(spec)]
        else:
            self.constant = check_lambda(spec)

    def at(self, step: int, timestep: float) -> float:
        """Lambda for denoiser call `step` (0-based) at `timestep`; raises past the end of a list."""
        if self.constant is not None:
            return self.constant
        if self.values is not None:
            if step >= len(self.values):
                raise DeradiffError(
                    f"lambda schedule has {len(self.values)} values but the sampler asked for step {step + 1}; "
                    "give one value per denoising step"
                )
            return self.values[step]
        assert self.fn is not None
        return check_lambda(self.fn(step, timestep), f"lambda schedule({step}, {timestep:g})")

    def check_length(self, num_steps: int) -> None:
        """Refuse a list whose length differs from the sampler's number of steps (callables are unchecked)."""
        if self.values is not None and len(self.values) != num_steps:
            raise DeradiffError(
                f"lambda schedule has {len(self.values)} values but the sampler runs {num_steps} steps; "
                "give one value per step (or a callable (step_index, timestep) -> lambda)"
            )

    def is_single_model(self) -> bool | None:
        """True when every step is exactly 0 or 1 (one forward per step, nothing is mixed); None if unknown."""
        if self.constant is not None:
            return self.constant in (0.0, 1.0)
        if self.values is not None:
            return all(v in (0.0, 1.0) for v in self.values)
        return None

    def __repr__(self) -> str:
        return f"LambdaSchedule({self.spec!r})"


def effective_beta(beta: float | None, lam: float) -> float | None:
    """The KL strength the realigned sampler targets: beta / lam (inf at lam 0, the base model).

    None when beta is unknown (e.g. a LoRA without deradiff metadata).
    """
    lam = check_lambda(lam)
    if beta is None:
        return None
    return math.inf if lam == 0.0 else float(beta) / lam


def describe_strength(beta: float | None, lam: float) -> str:
    """Human label for a lambda: 'base', 'beta=0.05', or 'beta/0.5' when beta is unknown."""
    lam = check_lambda(lam)
    if lam == 0.0:
        return "base"
    value = effective_beta(beta, lam)
    return f"beta/{lam:g}" if value is None else f"beta={value:g}"
