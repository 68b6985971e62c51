"""The config loader: YAML + overrides, and one clear error naming the key for every kind of bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from deradiff.config import config_to_dict, describe, load_config, option, save_config
from deradiff.errors import ConfigError


@dataclass
class Optim:
    lr: float = option(1e-4, "learning rate")
    betas: list[float] = option([0.9, 0.999], "Adam betas")


@dataclass
class Example:
    output_dir: str = option(help="where outputs go")
    steps: int = option(10, "optimizer steps")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "autocast dtype")
    resume_from: Optional[str] = option(None, "checkpoint to resume")
    verbose: bool = option(False, "chatty logging")
    optim: Optim = option(factory=Optim, help="optimizer settings")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nsteps: 5\noptim:\n  lr: 3.0e-4\n")
    cfg = load_config(Example, path, ["optim.lr=1e-3", "verbose=true", "optim.betas=[0.5, 0.6]"])
    assert cfg.output_dir == "out" and cfg.steps == 5 and cfg.verbose is True
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; the loader parses it
    assert cfg.optim.betas == [0.5, 0.6]


def test_unquoted_yaml_no_is_the_word_for_a_string_choice(tmp_path):
    """YAML 1.1 reads `no` as False; `mixed_precision: no` (file or override) must still mean "no"."""
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\nmixed_precision: no\n")
    assert load_config(Example, path).mixed_precision == "no"
    assert load_config(Example, None, ["output_dir=o", "mixed_precision=fp16", "mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="'mixed_precision' must be one of"):
        load_config(Example, None, ["output_dir=o", "mixed_precision=yes"])  # no option spells True
    assert load_config(Example, None, ["output_dir=o", "verbose=no"]).verbose is False  # real booleans unchanged


def test_defaults_are_not_shared_between_instances():
    a = load_config(Example, None, ["output_dir=a"])
    b = load_config(Example, None, ["output_dir=b"])
    a.optim.betas.append(1.0)
    assert b.optim.betas == [0.9, 0.999]


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(Example, None, ["output_dir=o", "optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"'steps' expects int, got 2.5"):
        load_config(Example, None, ["output_dir=o", "steps=2.5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["output_dir=o", "optim.lrr=1"], r"unknown config key 'optim.lrr'"),
        (["output_dir=o", "stepz=1"], r"unknown config key 'stepz'"),
        (["output_dir=o", "steps=many"], r"'steps' expects int, got 'many'"),
        (["output_dir=o", "verbose=maybe"], r"'verbose' expects true or false"),
        (["output_dir=o", "mixed_precision=fp8"], r"'mixed_precision' must be one of \['no', 'fp16', 'bf16'\]"),
        (["output_dir=o", "optim=3"], r"'optim' must be a mapping"),
        (["output_dir=o", "steps=1", "steps.x=3"], r"'steps' is not a section"),
        (["output_dir=o", "steps.x=3"], r"'steps' expects int, got \{'x': 3\}"),
        ([], r"'output_dir' is required"),
        (["output_dir"], r"override 'output_dir' must look like key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Example, None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(Example, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Example, bad)


def test_save_round_trip_and_describe(tmp_path):
    cfg = load_config(Example, None, ["output_dir=o", "resume_from=latest"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert config_to_dict(load_config(Example, tmp_path / "saved.yaml")) == config_to_dict(cfg)
    keys = {key: (kind, doc) for key, kind, doc in describe(Example)}
    assert keys["optim.lr"] == ("float", "learning rate")
    assert keys["resume_from"] == ("str or null", "checkpoint to resume")


def test_option_requires_help():
    with pytest.raises(ValueError):
        option(1)


def test_values_are_set_as_given_after_the_overrides():
    """A caller composing a config passes Python values: a path that the key=value text form would read as YAML
    (a mapping, a comment) stays the string it is, and values win over the user's overrides."""
    odd = "runs/a: b #1"
    cfg = load_config(Example, None, ["output_dir=user", "optim.lr=0.5"], {"output_dir": odd, "optim.lr": 0.25})
    assert cfg.output_dir == odd and cfg.optim.lr == 0.25
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(Example, None, ["output_dir=o"], {"optim.lr": "fast"})
