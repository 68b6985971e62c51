"""Realignment at sampling time (DeRaDiff): the mixing rule, lambda schedules, the drop-in denoiser.

`deradiff.realign(pipe, lam)` / `deradiff.unrealign(pipe)` live in `deradiff.realign.api` (imported lazily
by the top-level package, since it pulls in torch).
"""

from deradiff.realign.mixing import LambdaSchedule, check_lambda, describe_strength, effective_beta, mix_predictions

__all__ = ["LambdaSchedule", "check_lambda", "describe_strength", "effective_beta", "mix_predictions"]
