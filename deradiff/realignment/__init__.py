"""Realignment at sampling time (DeRaDiff): the mixing rule, lambda schedules, the two branches, the drop-in
denoiser, sweeps. The entry points `deradiff.realign(pipe, lam)` / `deradiff.unrealign(pipe)` live in `api`."""

from deradiff.realignment.mixing import LambdaSchedule, check_lambda, describe_strength, effective_beta, mix_predictions

__all__ = ["LambdaSchedule", "check_lambda", "describe_strength", "effective_beta", "mix_predictions"]
