"""Realignment at sampling time (DeRaDiff): the mixing rule, lambda schedules, the drop-in denoiser.

`deradiff.realign(pipe, lam)` / `deradiff.unrealign(pipe)` live in `deradiff.realign.api`.

Why this package is callable: `deradiff.realign` names both this subpackage and the function. Python sets
the package as the attribute `deradiff.realign` as soon as any `deradiff.realign.*` module is imported, which
would shadow the top-level lazy export of the function. Making the package module callable (forwarding to
`api.realign`) keeps `deradiff.realign(pipe, lam=...)` working whichever of the two the name resolves to.
"""

import sys
import types
from typing import Any

from deradiff.realign.mixing import LambdaSchedule, check_lambda, describe_strength, effective_beta, mix_predictions

__all__ = ["LambdaSchedule", "check_lambda", "describe_strength", "effective_beta", "mix_predictions"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from deradiff.realign.api import realign

        return realign(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
