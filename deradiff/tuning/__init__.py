"""Choosing the KL strength: which lambda (hence beta = beta0 / lambda) best meets a stated criterion.

`criterion` parses what the tune YAML asks for (maximize / minimize, subject_to), `select` (`choose`) applies
the interval-respecting rule to a table of measured lambdas, `search` places the lambdas, `sampling` samples
them as one batch of shared-noise trajectories, `measure` gives every metric its bootstrap interval, `stage`
runs the command (`run_tune`), `verify` retrains at the chosen beta, `report` draws the page, `api` is
`deradiff.tune(pipe, ...)`. (Named `tuning`, not `tune`, so that the `deradiff.tune` function can exist.)
"""

from deradiff.tuning.criterion import Constraint, Criterion, parse_criterion
from deradiff.tuning.select import Choice, InfeasibleError, Miss, choose, feasible, least_violating, total_violation

__all__ = ["Choice", "Constraint", "Criterion", "InfeasibleError", "Miss", "choose", "feasible", "least_violating",
           "parse_criterion", "total_violation"]
