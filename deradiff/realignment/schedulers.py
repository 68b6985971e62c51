"""Which samplers the mixture is exact for, and the scheduler-step wrapper that tells (it sees each step's eta).

The product p_ref^(1-l) * p_aligned^l of two Gaussians with the same variance is the Gaussian with the mixed
mean, so the rule is exact for *stochastic* Gaussian reverse steps: DDPM, DDIM with eta > 0, Euler ancestral.
Deterministic ODE solvers (DDIM eta=0, Euler, DPM-Solver, Heun, ...) have no per-step Gaussian; mixing their
predictions is an approximation (usually a good one). Those run, with a one-time `ApproximateSamplerWarning`.

DDIM is decided per call from the `eta` the pipeline passes to `scheduler.step`: eta > 0 is exact, eta == 0
(the diffusers default) warns.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

EXACT_SCHEDULERS = frozenset({"DDPMScheduler", "DDPMParallelScheduler", "EulerAncestralDiscreteScheduler"})
ETA_SCHEDULERS = frozenset({"DDIMScheduler", "DDIMParallelScheduler"})  # exact only with eta > 0

_HOOKED = "_deradiff_realign_hooks"


class ApproximateSamplerWarning(UserWarning):
    """The sampler is deterministic: the realigned mixture is an approximation of the target distribution."""


def is_exact(scheduler: Any, eta: float | None) -> bool:
    """True when mixing the predictions samples the geometric mixture exactly with this scheduler and eta."""
    name = type(scheduler).__name__
    if name in EXACT_SCHEDULERS:
        return True
    return name in ETA_SCHEDULERS and eta is not None and eta > 0


def approximation_message(scheduler: Any, eta: float | None) -> str:
    what = f"{type(scheduler).__name__}" + (f" with eta={eta:g}" if type(scheduler).__name__ in ETA_SCHEDULERS else "")
    return (
        f"realigned sampling with {what} is an approximation: the DeRaDiff mixture is exact only for stochastic "
        "Gaussian samplers (DDPM, DDIM with eta>0, Euler ancestral); deterministic solvers mix predictions "
        "along an ODE"
    )


def step_eta(scheduler: Any, args: tuple, kwargs: dict) -> float | None:
    """The eta a `scheduler.step(...)` call uses (None when the scheduler has no eta)."""
    if "eta" in kwargs:
        return float(kwargs["eta"])
    params = list(inspect.signature(type(scheduler).step).parameters.values())[1:]  # drop self
    for i, param in enumerate(params):  # args are the full positional arguments of step()
        if param.name == "eta":
            return float(args[i]) if i < len(args) else float(param.default)
    return None


def hook_scheduler(scheduler: Any, on_step: Callable[[Any, tuple, dict], None]) -> None:
    """Call `on_step(scheduler, args, kwargs)` before each `scheduler.step` (an instance attribute that shadows
    the class method, so `unhook_scheduler` restores the scheduler exactly; its config is never touched)."""
    unhook_scheduler(scheduler)
    step = scheduler.step

    @functools.wraps(step)
    def hooked_step(*args: Any, **kwargs: Any) -> Any:
        on_step(scheduler, args, kwargs)
        return step(*args, **kwargs)

    scheduler.__dict__.update({"step": hooked_step, _HOOKED: True})


def unhook_scheduler(scheduler: Any) -> None:
    for name in ("step", _HOOKED):
        scheduler.__dict__.pop(name, None)


def is_hooked(scheduler: Any) -> bool:
    return bool(scheduler.__dict__.get(_HOOKED))
