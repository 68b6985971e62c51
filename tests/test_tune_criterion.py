"""Parsing a tune criterion: every accepted form, and one clear line for every malformed one."""

from __future__ import annotations

import pytest

from deradiff.errors import ConfigError
from deradiff.tuning.criterion import Constraint, parse_criterion

KNOWN = frozenset({"vividness", "fidelity", "diversity", "path_kl", "kid_vs_base", "pickscore", "hpsv2", "oracle_kl"})
KNOWN_LIST = "diversity, fidelity, hpsv2, kid_vs_base, oracle_kl, path_kl, pickscore, vividness"


def test_single_metric_maximize():
    c = parse_criterion({"maximize": "vividness"}, KNOWN)
    assert c.objective == {"vividness": 1.0}
    assert c.constraints == []
    assert c.text == "maximize vividness"
    assert c.goal() == "highest vividness"
    assert c.metrics() == ["vividness"]


def test_minimize_folds_the_sign():
    c = parse_criterion({"minimize": "path_kl", "maximize": None}, KNOWN)  # None = absent (optional config field)
    assert c.objective == {"path_kl": -1.0}
    assert c.goal() == "lowest path_kl"
    assert c.value({"path_kl": 250.0}) == -250.0


@pytest.mark.parametrize("text, objective", [
    ("1.0*pickscore + 0.5*hpsv2", {"pickscore": 1.0, "hpsv2": 0.5}),
    ("pickscore+0.5*hpsv2-0.2*path_kl", {"pickscore": 1.0, "hpsv2": 0.5, "path_kl": -0.2}),  # implicit weight 1
    ("-vividness + 2 * fidelity", {"vividness": -1.0, "fidelity": 2.0}),  # leading sign, spaces round '*'
    ("1e-3*path_kl + 2.5E+1*oracle_kl + .5*hpsv2", {"path_kl": 1e-3, "oracle_kl": 25.0, "hpsv2": 0.5}),
    ("pickscore - 1e-2*kid_vs_base", {"pickscore": 1.0, "kid_vs_base": -0.01}),  # exponent sign does not split
])
def test_weighted_utility(text, objective):
    c = parse_criterion({"maximize": text}, KNOWN)
    assert c.objective == pytest.approx(objective)
    assert list(c.objective) == list(objective)  # order as written


def test_weighted_minimize_negates_every_weight_and_value_uses_them():
    c = parse_criterion({"minimize": "path_kl - 0.5*vividness"}, KNOWN)
    assert c.objective == {"path_kl": -1.0, "vividness": 0.5}
    assert c.value({"path_kl": 10.0, "vividness": 4.0, "fidelity": 0.9}) == pytest.approx(-8.0)
    with pytest.raises(ValueError, match="vividness"):
        c.value({"path_kl": 10.0})


def test_constraints_of_each_operator():
    c = parse_criterion({"maximize": "vividness",
                         "subject_to": ["fidelity >= 0.8", "path_kl<=300", "diversity > -1.5e-2", "kid_vs_base < 2E3"]},
                        KNOWN)
    assert c.constraints == [Constraint("fidelity", ">=", 0.8), Constraint("path_kl", "<=", 300.0),
                             Constraint("diversity", ">", -0.015), Constraint("kid_vs_base", "<", 2000.0)]
    assert c.metrics() == ["vividness", "fidelity", "path_kl", "diversity", "kid_vs_base"]
    assert c.text == "maximize vividness subject to fidelity >= 0.8, path_kl <= 300, diversity > -0.015, kid_vs_base < 2000"


def test_one_constraint_may_be_a_plain_string_and_a_metric_may_appear_twice_in_constraints():
    c = parse_criterion({"maximize": "vividness", "subject_to": "path_kl <= 300"}, KNOWN)
    assert c.constraints == [Constraint("path_kl", "<=", 300.0)]
    two = parse_criterion({"maximize": "vividness", "subject_to": ["path_kl >= 10", "path_kl <= 300"]}, KNOWN)
    assert two.metrics() == ["vividness", "path_kl"]


def test_constraint_judges_the_whole_interval():
    at_least, above = Constraint("fidelity", ">=", 0.8), Constraint("fidelity", ">", 0.8)
    assert at_least.holds(0.8, 0.9) and not above.holds(0.8, 0.9)
    assert not at_least.holds(0.79, 0.95)  # point may pass; the lower end does not
    at_most = Constraint("path_kl", "<=", 300.0)
    assert at_most.holds(100.0, 300.0) and not at_most.holds(100.0, 301.0)
    assert at_most.shortfall(100.0, 330.0) == pytest.approx(30.0)
    assert at_most.violation(100.0, 330.0) == pytest.approx(0.1)
    assert at_least.shortfall(0.7, 0.9) == pytest.approx(0.1)
    assert at_least.shortfall(float("nan"), 0.9) == float("inf")


def test_to_dict_round_trips_the_pieces():
    c = parse_criterion({"maximize": "vividness", "subject_to": ["fidelity >= 0.8"]}, KNOWN)
    assert c.to_dict() == {"text": "maximize vividness subject to fidelity >= 0.8", "sense": "maximize",
                           "expression": "vividness", "objective": {"vividness": 1.0},
                           "constraints": [{"metric": "fidelity", "op": ">=", "bound": 0.8}]}


EXPECTED = "expected a metric or a weighted sum like '1.0*pickscore + 0.5*hpsv2'"


@pytest.mark.parametrize("spec, message", [
    ({"maximize": "vivdness"},
     f"criterion 'maximize: vivdness': unknown metric 'vivdness' (did you mean 'vividness'?); known: {KNOWN_LIST}"),
    ({"maximize": "0.5*hpsv2 + zzz"}, f"criterion 'maximize: 0.5*hpsv2 + zzz': unknown metric 'zzz'; known: {KNOWN_LIST}"),
    ({"maximize": "vividness", "subject_to": ["fidelty >= 0.8"]},
     f"constraint 'fidelty >= 0.8': unknown metric 'fidelty' (did you mean 'fidelity'?); known: {KNOWN_LIST}"),
    ({"maximize": "vividness", "minimize": "path_kl"},
     "criterion has both 'maximize' and 'minimize': give exactly one, e.g. 'maximize: vividness'"),
    ({"subject_to": ["fidelity >= 0.8"]},
     "criterion needs 'maximize' or 'minimize': give exactly one, e.g. 'maximize: vividness'"),
    ({"maximise": "vividness"},
     "criterion: unknown key 'maximise'; expected 'maximize' or 'minimize', and optionally 'subject_to'"),
    ({"maximize": "vividness", "subject_to": ["fidelity => 0.8"]},
     "constraint 'fidelity => 0.8' must look like '<metric> >= <number>' (operators >=, <=, >, <)"),
    ({"maximize": "vividness", "subject_to": ["fidelity == 0.8"]},
     "constraint 'fidelity == 0.8' must look like '<metric> >= <number>' (operators >=, <=, >, <)"),
    ({"maximize": "vividness", "subject_to": ["0.8 <= fidelity"]},
     "constraint '0.8 <= fidelity' must look like '<metric> >= <number>' (operators >=, <=, >, <)"),
    ({"maximize": "vividness", "subject_to": ["fidelity >= high"]},
     "constraint 'fidelity >= high' must look like '<metric> >= <number>' (operators >=, <=, >, <)"),
    ({"maximize": "vividness", "subject_to": [{"fidelity": 0.8}]},
     "constraint '{'fidelity': 0.8}' must look like '<metric> >= <number>' (operators >=, <=, >, <)"),
    ({"maximize": "vividness", "subject_to": ["fidelity >= 1e999"]},
     "constraint 'fidelity >= 1e999': bound '1e999' is not a finite number"),
    ({"maximize": "vividness", "subject_to": 0.8},
     "criterion 'subject_to' must be a list of constraints like ['fidelity >= 0.8'], got 0.8"),
    ({"maximize": "abc*vividness"},
     "criterion 'maximize: abc*vividness': weight 'abc' in 'abc*vividness' is not a number; write terms like '0.5*hpsv2'"),
    ({"maximize": "1.2.3*vividness"},
     "criterion 'maximize: 1.2.3*vividness': weight '1.2.3' in '1.2.3*vividness' is not a number; "
     "write terms like '0.5*hpsv2'"),
    ({"maximize": "1e999*vividness"},
     "criterion 'maximize: 1e999*vividness': weight '1e999' in '1e999*vividness' is not a finite number"),
    ({"maximize": "pickscore + 0.5hpsv2"}, "criterion 'maximize: pickscore + 0.5hpsv2': cannot read term '0.5hpsv2'; write '0.5*hpsv2'"),
    ({"maximize": "vividness*2"},
     "criterion 'maximize: vividness*2': weight 'vividness' in 'vividness*2' is not a number; write terms like '0.5*hpsv2'"),
    ({"maximize": "2"}, "criterion 'maximize: 2': cannot read term '2'; write terms like '0.5*hpsv2'"),
    ({"maximize": "vividness +"}, f"criterion 'maximize: vividness +': ends with a sign; {EXPECTED}"),
    ({"maximize": "vividness + - fidelity"}, f"criterion 'maximize: vividness + - fidelity': sign '-' follows another sign; {EXPECTED}"),
    ({"maximize": "vividness + vividness"},
     "criterion 'maximize: vividness + vividness': metric 'vividness' appears twice; give it once with the combined weight"),
    ({"maximize": ""}, f"criterion 'maximize' is empty; {EXPECTED}"),
    ({"minimize": "   "}, f"criterion 'minimize' is empty; {EXPECTED}"),
    ({"maximize": 3}, f"criterion 'maximize: 3': {EXPECTED}"),
    ({}, "criterion needs 'maximize' or 'minimize': give exactly one, e.g. 'maximize: vividness'"),
    ("maximize: vividness", "criterion must be a mapping like {maximize: vividness, subject_to: [...]}, "
                            "got 'maximize: vividness'"),
])
def test_invalid_criterion_is_one_clear_line(spec, message):
    with pytest.raises(ConfigError) as caught:
        parse_criterion(spec, KNOWN)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_multiline_yaml_text_is_reported_on_one_line():
    with pytest.raises(ConfigError) as caught:
        parse_criterion({"maximize": "1.0*pickscore\n  + 0.5*hpsvv2\n"}, KNOWN)
    assert str(caught.value).startswith("criterion 'maximize: 1.0*pickscore + 0.5*hpsvv2': unknown metric 'hpsvv2'")
    assert "\n" not in str(caught.value)
