"""The DeRaDiff mixing rule and lambda schedules, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from deradiff.errors import DeradiffError
from deradiff.realignment.mixing import LambdaSchedule, check_lambda, describe_strength, effective_beta, mix_predictions


def test_mix_hand_computed():
    ref, aligned = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert mix_predictions(ref, aligned, 0.5).tolist() == [2.0, 4.0]  # 0.5*1+0.5*3, 0.5*2+0.5*6
    assert mix_predictions(ref, aligned, 2.0).tolist() == [5.0, 10.0]  # -1*1+2*3 (extrapolation)
    assert mix_predictions(ref, aligned, 0.25).tolist() == [1.5, 3.0]  # 0.75*1+0.25*3
    assert mix_predictions(1.0, 3.0, 0.75) == 2.5


def test_mix_endpoints_are_exact_pass_through():
    ref, aligned = torch.randn(3), torch.randn(3)
    assert mix_predictions(ref, aligned, 0.0) is ref
    assert mix_predictions(ref, aligned, 1.0) is aligned


@pytest.mark.parametrize("bad", [-0.5, -1, math.nan, math.inf, -math.inf, "0.5", None, True])
def test_bad_lambda_is_one_line_error_naming_value(bad):
    with pytest.raises(DeradiffError) as exc:
        check_lambda(bad)
    message = str(exc.value)
    assert "\n" not in message
    assert str(float(bad) if isinstance(bad, (int, float)) and not isinstance(bad, bool) else repr(bad)) in message


def test_lambda_above_one_allowed():
    assert check_lambda(3) == 3.0 and isinstance(check_lambda(3), float)


def test_list_schedule_indexes_by_step_and_checks_length():
    schedule = LambdaSchedule([0.0, 0.5, 2.0])
    assert [schedule.at(i, 999.0 - i) for i in range(3)] == [0.0, 0.5, 2.0]
    schedule.check_length(3)
    with pytest.raises(DeradiffError, match="3 values but the sampler runs 4 steps"):
        schedule.check_length(4)
    with pytest.raises(DeradiffError, match="step 4"):
        schedule.at(3, 0.0)


@pytest.mark.parametrize("bad", [[], [0.5, -1.0], [0.5, math.nan]])
def test_bad_list_schedules(bad):
    with pytest.raises(DeradiffError, match="empty|schedule\\[1\\]"):
        LambdaSchedule(bad)


def test_callable_schedule_gets_step_and_timestep_and_is_validated():
    schedule = LambdaSchedule(lambda step, t: t / 1000 + step)
    assert schedule.at(1, 500.0) == 1.5
    schedule.check_length(123)  # callables adapt to any number of steps
    with pytest.raises(DeradiffError, match="-1"):
        LambdaSchedule(lambda step, t: -1.0).at(0, 10.0)


def test_single_model_detection():
    assert LambdaSchedule(1.0).is_single_model() and LambdaSchedule([0, 1]).is_single_model()
    assert LambdaSchedule(0.5).is_single_model() is False
    assert LambdaSchedule(lambda s, t: 1.0).is_single_model() is None


def test_effective_beta():
    assert effective_beta(0.1, 0.5) == pytest.approx(0.2)  # weaker alignment = stronger KL
    assert effective_beta(0.1, 2.0) == pytest.approx(0.05)
    assert effective_beta(0.1, 0.0) == math.inf
    assert effective_beta(None, 2.0) is None
    assert describe_strength(0.1, 0.0) == "base"
    assert describe_strength(0.1, 2.0) == "beta=0.05"
    assert describe_strength(None, 2.0) == "beta/2"
