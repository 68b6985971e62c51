"""The selection rule of `deradiff tune` on synthetic metric tables whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from deradiff.errors import DeradiffError
from deradiff.tuning.criterion import parse_criterion
from deradiff.tuning.select import InfeasibleError, choose, least_violating, total_violation

KNOWN = {"vividness", "fidelity", "path_kl", "diversity"}


def row(lam: float, objective: tuple[float, float, float], **intervals: tuple[float, float]) -> dict[str, float]:
    """One measured lambda: objective (point, lo, hi) and constrained metrics as (lo, hi)."""
    out = {"lambda": lam, "objective": objective[0], "objective_lo": objective[1], "objective_hi": objective[2]}
    for name, (lo, hi) in intervals.items():
        out.update({name: (lo + hi) / 2, f"{name}_lo": lo, f"{name}_hi": hi})
    return out


def crit(maximize: str = "vividness", *constraints: str):
    return parse_criterion({"maximize": maximize, "subject_to": list(constraints)}, KNOWN)


def test_clear_best_is_chosen():
    rows = [row(0.0, (0.10, 0.05, 0.15)), row(0.5, (0.50, 0.45, 0.55)), row(1.0, (0.90, 0.85, 0.95)),
            row(2.0, (0.40, 0.35, 0.45))]
    choice = choose(rows, crit(), beta0=0.08)
    assert (choice.lam, choice.best, choice.tied) == (1.0, 1.0, [1.0])
    assert choice.beta == pytest.approx(0.08)
    assert choice.feasible == [0.0, 0.5, 1.0, 2.0]
    assert choice.reason == ("lambda 1 (beta 0.08): highest vividness among all 4 lambdas; "
                             "no other of them is within its interval")


def test_tie_within_the_interval_goes_to_the_smaller_lambda():
    # best point at 1.0 (lo 0.82); 0.5 (hi 0.90) and 0.75 (hi 0.92) reach it, 2.0 (hi 0.65) does not.
    rows = [row(2.0, (0.60, 0.55, 0.65)), row(1.0, (0.90, 0.82, 0.98)), row(0.75, (0.85, 0.78, 0.92)),
            row(0.5, (0.80, 0.70, 0.90)), row(0.25, (0.50, 0.40, 0.81))]
    choice = choose(rows, crit(), beta0=0.1)
    assert choice.best == 1.0
    assert choice.tied == [0.5, 0.75, 1.0]
    assert choice.lam == 0.5 and choice.beta == pytest.approx(0.2)
    assert choice.reason == ("lambda 0.5 (beta 0.2): lambda 1 has the highest vividness among all 5 lambdas, but "
                             "lambdas 0.5, 0.75, 1 are within its interval, the smallest (strongest regularization) "
                             "is chosen")


def test_tie_boundary_counts_an_interval_that_just_touches():
    rows = [row(0.5, (0.70, 0.60, 0.80)), row(1.0, (0.90, 0.80, 1.00))]
    assert choose(rows, crit(), beta0=1.0).lam == 0.5


def test_equal_points_prefer_the_smaller_lambda_as_best():
    rows = [row(1.0, (0.5, 0.5, 0.5)), row(0.5, (0.5, 0.5, 0.5))]
    choice = choose(rows, crit(), beta0=1.0)
    assert (choice.best, choice.lam) == (0.5, 0.5)


def test_point_passes_but_interval_does_not_is_excluded():
    c = crit("vividness", "fidelity >= 0.8", "path_kl <= 300")
    rows = [row(0.5, (0.3, 0.25, 0.35), fidelity=(0.90, 0.97), path_kl=(50, 90)),
            row(1.0, (0.6, 0.55, 0.65), fidelity=(0.81, 0.90), path_kl=(120, 200)),
            row(1.5, (0.8, 0.75, 0.85), fidelity=(0.78, 0.92), path_kl=(200, 280)),  # fidelity point 0.85 passes
            row(2.0, (0.9, 0.85, 0.95), fidelity=(0.82, 0.95), path_kl=(250, 310))]  # path_kl point 280 passes
    assert rows[2]["fidelity"] >= 0.8 and rows[3]["path_kl"] <= 300
    choice = choose(rows, c, beta0=0.2)
    assert choice.feasible == [0.5, 1.0]
    assert (choice.lam, choice.tied) == (1.0, [1.0])
    assert choice.reason == ("lambda 1 (beta 0.2): highest vividness among the 2 of 4 lambdas whose whole fidelity "
                             "interval is >= 0.8 and whose whole path_kl interval is <= 300; no other of them is "
                             "within its interval")


def test_strict_operator_excludes_an_interval_end_at_the_bound():
    c = crit("vividness", "fidelity > 0.8")
    rows = [row(0.5, (0.3, 0.2, 0.4), fidelity=(0.85, 0.9)), row(1.0, (0.9, 0.8, 1.0), fidelity=(0.8, 0.9))]
    assert choose(rows, c, beta0=1.0).feasible == [0.5]


def test_infeasible_names_the_least_violating_lambda():
    # Normalized violations: 0.25 -> 0.02/0.8 = 0.025; 0.5 -> 0.1/0.8 = 0.125; 1 -> 0.3/0.8 + 30/300 = 0.475.
    c = crit("vividness", "fidelity >= 0.8", "path_kl <= 300")
    rows = [row(1.0, (0.9, 0.8, 1.0), fidelity=(0.50, 0.60), path_kl=(200, 330)),
            row(0.25, (0.2, 0.1, 0.3), fidelity=(0.78, 0.85), path_kl=(10, 100)),  # point 0.815 passes
            row(0.5, (0.5, 0.4, 0.6), fidelity=(0.70, 0.75), path_kl=(50, 150))]
    assert [total_violation(r, c) for r in rows] == pytest.approx([0.475, 0.025, 0.125])
    with pytest.raises(InfeasibleError) as caught:
        choose(rows, c, beta0=0.08)
    err = caught.value
    assert isinstance(err, DeradiffError)  # the CLI prints it as one error line and exits non-zero
    assert err.lam == 0.25 and [m.constraint.metric for m in err.misses] == ["fidelity"]
    assert str(err) == ("no lambda satisfies 'maximize vividness subject to fidelity >= 0.8, path_kl <= 300' with its "
                        "whole interval (3 lambdas from 0.25 to 1 tried); the least violating is lambda 0.25 "
                        "(beta 0.32), where fidelity >= 0.8 fails: interval [0.78, 0.85] has its lower end 0.78, "
                        "0.02 below the bound (total normalized violation 0.025); each constraint alone holds: "
                        "fidelity >= 0.8 at 0, path_kl <= 300 at 2; relax a constraint or widen the lambda range")


def test_least_violating_compares_violations_relative_to_each_bound():
    # Raw shortfalls: 0.05 fidelity at 0.5 vs 3 path_kl at 2.0; relative to the bounds 0.0625 vs 0.01.
    c = crit("vividness", "fidelity >= 0.8", "path_kl <= 300")
    rows = [row(0.5, (0.2, 0.1, 0.3), fidelity=(0.75, 0.9), path_kl=(10, 50)),
            row(2.0, (0.9, 0.8, 1.0), fidelity=(0.85, 0.9), path_kl=(280, 303))]
    assert [total_violation(r, c) for r in rows] == pytest.approx([0.0625, 0.01])
    assert least_violating(rows, c)["lambda"] == 2.0
    with pytest.raises(InfeasibleError, match=r"least violating is lambda 2 \(beta 0.05\), where path_kl <= 300 fails: "
                                              r"interval \[280, 303\] has its upper end 303, 3 above the bound"):
        choose(rows, c, beta0=0.1)


def test_infeasible_at_the_bound_of_a_strict_operator_and_with_an_undefined_interval():
    c = crit("vividness", "fidelity > 0.8")
    rows = [row(0.5, (0.2, 0.1, 0.3), fidelity=(0.8, 0.9)), row(1.0, (0.9, 0.8, 1.0), fidelity=(math.nan, math.nan))]
    assert total_violation(rows[0], c) == 0.0 and total_violation(rows[1], c) == math.inf
    with pytest.raises(InfeasibleError, match=r"lambda 0.5 \(beta 2\), where fidelity > 0.8 fails: interval "
                                              r"\[0.8, 0.9\] has its lower end at the bound"):
        choose(rows, c, beta0=1.0)


def test_lambda_zero_is_the_base_model_with_beta_inf():
    # Only the base model keeps fidelity; realigned lambdas gain reward but lose the shapes.
    c = crit("vividness", "fidelity >= 0.8")
    rows = [row(0.0, (0.1, 0.05, 0.15), fidelity=(0.85, 0.95)), row(1.0, (0.9, 0.8, 1.0), fidelity=(0.3, 0.5))]
    choice = choose(rows, c, beta0=0.08)
    assert choice.lam == 0.0 and choice.beta == math.inf
    assert choice.reason.startswith("lambda 0 (beta inf: the base model): highest vividness among the 1 of 2 lambdas")


def test_unknown_beta0_gives_no_beta():
    choice = choose([row(1.0, (0.5, 0.4, 0.6))], crit(), beta0=None)
    assert choice.beta is None and choice.reason.startswith("lambda 1 (beta0 unknown)")


def test_minimize_reads_the_folded_objective_and_says_lowest():
    c = parse_criterion({"minimize": "path_kl"}, KNOWN)
    values = {0.5: 40.0, 1.0: 120.0, 2.0: 400.0}  # objective = -path_kl, interval +-10 (folded too)
    rows = [row(lam, (c.value({"path_kl": v}), -v - 10, -v + 10)) for lam, v in values.items()]
    choice = choose(rows, c, beta0=1.0)
    assert choice.lam == 0.5 and choice.reason.startswith("lambda 0.5 (beta 2): lowest path_kl among all 3 lambdas")


def test_weighted_objective_reason_names_the_expression():
    c = parse_criterion({"maximize": "1.0*vividness + 0.5*fidelity"}, KNOWN)
    choice = choose([row(1.0, (0.5, 0.4, 0.6)), row(2.0, (0.9, 0.55, 1.0))], c, beta0=1.0)
    assert choice.reason == ("lambda 1 (beta 1): lambda 2 has the highest 1.0*vividness + 0.5*fidelity among all 2 "
                             "lambdas, but lambdas 1, 2 are within its interval, the smallest (strongest "
                             "regularization) is chosen")


def test_many_tied_lambdas_are_summarised_as_a_range():
    rows = [row(lam, (0.5 + lam / 10, 0.0, 1.0)) for lam in (0.25, 0.5, 0.75, 1.0, 1.5)]
    assert "lambdas 0.25 to 1.5 (5 lambdas) are within its interval" in choose(rows, crit(), beta0=1.0).reason


def test_to_dict_is_plain_data():
    choice = choose([row(0.5, (0.5, 0.4, 0.6))], crit(), beta0=1.0)
    assert choice.to_dict() == {"lam": 0.5, "beta": 2.0, "best": 0.5, "feasible": [0.5], "tied": [0.5],
                                "reason": choice.reason}


@pytest.mark.parametrize("rows, error, message", [
    ([], ValueError, "at least one measured lambda"),
    ([{"lambda": 1.0, "objective": 0.5, "objective_lo": 0.4}], ValueError, r"lambda 1 lacks \['objective_hi'"),
    ([row(1.0, (0.5, 0.4, 0.6)), row(1.0, (0.6, 0.5, 0.7))], ValueError, "unique"),
    ([row(1.0, (math.nan, 0.4, 0.6))], ValueError, "non-finite objective"),
    ([row(-0.5, (0.5, 0.4, 0.6))], DeradiffError, "must be >= 0"),
])
def test_malformed_tables_are_caller_errors(rows, error, message):
    with pytest.raises(error, match=message):
        choose(rows, crit(), beta0=1.0)


def test_a_constrained_metric_without_its_interval_is_a_caller_error():
    with pytest.raises(ValueError, match=r"lacks \['fidelity_lo', 'fidelity_hi'\]"):
        choose([row(1.0, (0.5, 0.4, 0.6))], crit("vividness", "fidelity >= 0.8"), beta0=1.0)


def test_paired_gaps_decide_ties_when_the_table_has_them():
    """Marginal intervals all overlap (prompt spread shared by every lambda), but the paired gap to the best
    excludes 0 for 0.5: only 0.75 is tied; without gaps, all three would be."""
    rows = [row(0.5, (0.60, 0.30, 0.90)), row(0.75, (0.68, 0.38, 0.98)), row(1.0, (0.70, 0.40, 1.00))]
    assert choose(rows, crit(), beta0=1.0).tied == [0.5, 0.75, 1.0]
    for r, gap in zip(rows, [(-0.10, -0.14, -0.06), (-0.02, -0.05, 0.01), (0.0, 0.0, 0.0)]):
        r.update({"objective_gap": gap[0], "objective_gap_lo": gap[1], "objective_gap_hi": gap[2]})
    choice = choose(rows, crit(), beta0=1.0)
    assert (choice.lam, choice.best, choice.tied) == (0.75, 1.0, [0.75, 1.0])
