"""Choosing the KL strength: which lambda (hence beta = beta0 / lambda) best meets a stated criterion.

This package's pure core: `criterion` parses what the tune YAML asks for (maximize / minimize, subject_to),
`select` (`choose`) applies the interval-respecting rule to a table of measured lambdas. Sampling and the command
build on these. (Named `tuning`, not `tune`, so that a `deradiff.tune(...)` function can exist beside it.)
"""

from deradiff.tuning.criterion import Constraint, Criterion, parse_criterion
from deradiff.tuning.select import Choice, InfeasibleError, Miss, choose, feasible, least_violating, total_violation

__all__ = ["Choice", "Constraint", "Criterion", "InfeasibleError", "Miss", "choose", "feasible", "least_violating",
           "parse_criterion", "total_violation"]
