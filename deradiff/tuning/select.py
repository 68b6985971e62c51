"""Choosing lambda from a table of measured lambdas: the rule that respects the intervals.

Input: one row per lambda, a mapping with
    'lambda'                                   the realignment factor (>= 0),
    '<metric>_lo', '<metric>_hi'               the 95% bootstrap interval of every constrained metric,
    'objective', 'objective_lo', 'objective_hi' the criterion's objective (Criterion.value, larger is better).
The objective's interval must come from the caller's bootstrap (Criterion.value applied to each replicate),
not from the metrics' intervals: the ends of a weighted sum's interval are not the weighted sums of the ends
(the metrics are correlated across replicates, and with mixed signs lo/hi would even swap roles).

The rule:
1. feasible: every constrained metric's WHOLE interval satisfies its constraint (>=: lo >= bound; <=: hi <= bound),
   so a lambda whose point estimate passes but whose interval straddles the bound is not trusted;
2. best: the feasible lambda with the highest objective point estimate;
3. tied: every feasible lambda the data cannot tell apart from the best. With 'objective_gap_lo/_hi' in the
   rows (the interval of objective(lambda) - objective(best) from the same bootstrap draws, as the tune
   measures it: every lambda saw the same prompts, seeds and noise), tied means the gap's interval reaches 0
   (gap_hi >= 0). Without them, the marginal intervals overlap (hi >= best's lo): a far weaker test, since
   the prompt-to-prompt spread every lambda shares widens each marginal interval but cancels in the gap;
4. chosen: the smallest tied lambda, i.e. the strongest regularization (beta0 / lambda is largest), because
   less reward-pushing at equal measured benefit is the safer side of reward hacking.
`choose` applies it; no feasible lambda raises InfeasibleError naming the least-violating lambda (`least_violating`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from deradiff.errors import DeradiffError
from deradiff.realignment.mixing import check_lambda, effective_beta
from deradiff.tuning.criterion import Constraint, Criterion

Row = Mapping[str, Any]
OBJECTIVE_KEYS = ("objective", "objective_lo", "objective_hi")


@dataclass(frozen=True)
class Miss:
    """One failed constraint at one lambda: the interval it was judged on and how far it misses."""

    constraint: Constraint
    lo: float
    hi: float

    @property
    def shortfall(self) -> float:
        return self.constraint.shortfall(self.lo, self.hi)

    def describe(self) -> str:
        c = self.constraint
        if math.isinf(self.shortfall):
            return f"{c.text} fails: interval [{self.lo:.4g}, {self.hi:.4g}] is undefined (nan)"
        end, side = ("lower", "below") if c.lower else ("upper", "above")
        value = self.lo if c.lower else self.hi
        if self.shortfall == 0.0:  # exactly at the bound of a strict operator
            return f"{c.text} fails: interval [{self.lo:.4g}, {self.hi:.4g}] has its {end} end at the bound"
        return (f"{c.text} fails: interval [{self.lo:.4g}, {self.hi:.4g}] has its {end} end {value:.4g}, "
                f"{self.shortfall:.3g} {side} the bound")


class InfeasibleError(DeradiffError):
    """No measured lambda satisfies every constraint with its whole interval."""

    def __init__(self, message: str, lam: float, misses: list[Miss]):
        super().__init__(message)
        self.lam = lam
        self.misses = misses


@dataclass(frozen=True)
class Choice:
    """The chosen lambda, its emulated beta (beta0 / lambda; inf at 0; None if beta0 is unknown) and why."""

    lam: float
    beta: float | None
    best: float  # the feasible lambda with the highest objective point estimate
    feasible: list[float]
    tied: list[float]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose(rows: Sequence[Row], criterion: Criterion, beta0: float | None) -> Choice:
    """Apply the rule of this module to `rows` (one per lambda). Raises InfeasibleError if nothing is feasible."""
    rows = _checked(rows, criterion)
    ok = feasible(rows, criterion)
    if not ok:
        raise _infeasible(rows, criterion, beta0)
    best = best_feasible(ok)
    tied = [r for r in ok if r is best or _tied(r, best)]
    lam, best_lam, tied_lams = float(tied[0]["lambda"]), float(best["lambda"]), [float(r["lambda"]) for r in tied]
    beta = effective_beta(beta0, lam)
    reason = _reason(lam, beta, best_lam, tied_lams, len(ok), len(rows), criterion)
    return Choice(lam=lam, beta=beta, best=best_lam, feasible=[float(r["lambda"]) for r in ok], tied=tied_lams,
                  reason=reason)


def best_feasible(ok: Sequence[Row]) -> Row:
    """The row with the highest objective point estimate among feasible rows sorted by lambda (equal points:
    the smaller lambda)."""
    return max(ok, key=lambda r: r["objective"])


def _tied(row: Row, best: Row) -> bool:
    if "objective_gap_hi" in row:
        return float(row["objective_gap_hi"]) >= 0.0
    return row["objective_hi"] >= best["objective_lo"]


def feasible(rows: Sequence[Row], criterion: Criterion) -> list[Row]:
    """The rows whose every constrained metric's whole interval satisfies its constraint, in the given order."""
    return [r for r in rows if not misses(r, criterion)]


def misses(row: Row, criterion: Criterion) -> list[Miss]:
    """The constraints `row` fails (judged on the whole interval)."""
    found = [Miss(c, float(row[f"{c.metric}_lo"]), float(row[f"{c.metric}_hi"])) for c in criterion.constraints]
    return [m for m in found if not m.constraint.holds(m.lo, m.hi)]


def total_violation(row: Row, criterion: Criterion) -> float:
    """Sum over constraints of max(0, shortfall of the relevant interval end) / max(|bound|, 1e-12); 0 = feasible
    or only at the bound of a strict operator; inf when a constrained interval is NaN."""
    return sum(m.constraint.violation(m.lo, m.hi) for m in misses(row, criterion))


def least_violating(rows: Sequence[Row], criterion: Criterion) -> Row:
    """The row with the smallest total_violation; among equals the smaller lambda (stronger regularization)."""
    return min(sorted(rows, key=lambda r: float(r["lambda"])), key=lambda r: total_violation(r, criterion))


def _checked(rows: Sequence[Row], criterion: Criterion) -> list[Row]:
    """Rows sorted by lambda after checking what the rule reads: a bad table is the caller's bug (ValueError)."""
    if not rows:
        raise ValueError("choose needs at least one measured lambda")
    needed = [*OBJECTIVE_KEYS, *(f"{c.metric}_{end}" for c in criterion.constraints for end in ("lo", "hi"))]
    for row in rows:
        lam = check_lambda(row.get("lambda"), "lambda of a tune row")
        absent = [k for k in needed if k not in row]
        if absent:
            raise ValueError(f"row for lambda {lam:g} lacks {absent}")
        if not all(math.isfinite(float(row[k])) for k in OBJECTIVE_KEYS):
            raise ValueError(f"row for lambda {lam:g} has a non-finite objective or objective interval")
    ordered = sorted(rows, key=lambda r: float(r["lambda"]))
    lams = [float(r["lambda"]) for r in ordered]
    if len(set(lams)) != len(lams):
        raise ValueError(f"lambdas must be unique, got {lams}")
    return ordered


def _lams(values: Sequence[float]) -> str:
    """'0.5, 0.62' for a few lambdas, '0.62 to 0.9 (5 lambdas)' for many."""
    if len(values) <= 3:
        return ", ".join(f"{v:.4g}" for v in values)
    return f"{values[0]:.4g} to {values[-1]:.4g} ({len(values)} lambdas)"


def _beta_text(beta: float | None) -> str:
    if beta is None:
        return "beta0 unknown"
    return "beta inf: the base model" if math.isinf(beta) else f"beta {beta:.4g}"


def _among(n_ok: int, n_all: int, criterion: Criterion) -> str:
    if not criterion.constraints:
        return f"among all {n_all} lambdas"
    return f"among the {n_ok} of {n_all} lambdas " + " and ".join(c.describe() for c in criterion.constraints)


def _reason(lam: float, beta: float | None, best: float, tied: list[float], n_ok: int, n_all: int,
            criterion: Criterion) -> str:
    """One plain-words sentence: what is best, among which lambdas, and why the chosen one."""
    head = f"lambda {lam:.4g} ({_beta_text(beta)})"
    among = _among(n_ok, n_all, criterion)
    if len(tied) == 1:
        return f"{head}: {criterion.goal()} {among}; no other of them is within its interval"
    ties = f"lambdas {_lams(tied)} are within its interval, the smallest (strongest regularization) is chosen"
    if lam == best:
        return f"{head}: {criterion.goal()} {among}; {ties}"
    return f"{head}: lambda {best:.4g} has the {criterion.goal()} {among}, but {ties}"


def _count_holding(rows: Sequence[Row], constraint: Constraint) -> int:
    """At how many lambdas this one constraint holds on its whole interval."""
    return sum(constraint.holds(float(r[f"{constraint.metric}_lo"]), float(r[f"{constraint.metric}_hi"])) for r in rows)


def _infeasible(rows: Sequence[Row], criterion: Criterion, beta0: float | None) -> InfeasibleError:
    """The error for an empty feasible set: the least-violating lambda, how each constraint fails there, and how
    many lambdas each constraint alone admits (which one is the blocker)."""
    row = least_violating(rows, criterion)
    lam = float(row["lambda"])
    found = misses(row, criterion)
    alone = ", ".join(f"{c.text} at {_count_holding(rows, c)}" for c in criterion.constraints)
    message = (f"no lambda satisfies '{criterion.text}' with its whole interval ({len(rows)} lambdas from "
               f"{float(rows[0]['lambda']):.4g} to {float(rows[-1]['lambda']):.4g} tried); the least violating is "
               f"lambda {lam:.4g} ({_beta_text(effective_beta(beta0, lam))}), where "
               f"{'; '.join(m.describe() for m in found)} (total normalized violation "
               f"{total_violation(row, criterion):.3g}); each constraint alone holds: {alone}; "
               "relax a constraint or widen the lambda range")
    return InfeasibleError(message, lam, found)
