"""Every YAML under configs/ loads and validates against its stage's schema (torchtune-style)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from deradiff.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# File stem → schema. A new config kind must be added here, so no YAML goes unvalidated.
SCHEMAS = {
    "pretrain": "deradiff.world.config:PretrainConfig",
    "quality": "deradiff.world.config:QualityConfig",
    "prefs": "deradiff.data.config:PrefsConfig",
    "dpo": "deradiff.training.config:DPOConfig",
    "ddpo": "deradiff.training.config:DDPOConfig",
    "reward_grad": "deradiff.training.config:RewardGradConfig",
    "reward_grad_weak": "deradiff.training.config:RewardGradConfig",
    "tune": "deradiff.tuning.config:TuneConfig",
    "realign": "deradiff.realignment.config:RealignConfig",
    "eval": "deradiff.eval.config:EvalConfig",
    "study": "deradiff.study:StudyConfig",
    "study_dpo": "deradiff.study:StudyConfig",
    "study_full": "deradiff.study:StudyConfig",
}


def _schema(stem: str) -> type:
    module, name = SCHEMAS[stem].split(":")
    return getattr(importlib.import_module(module), name)


YAML_FILES = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_exist():
    assert len(YAML_FILES) >= 8


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_loads(path: Path):
    assert path.stem in SCHEMAS, f"{path} has no schema registered in tests/test_configs_shipped.py"
    config = load_config(_schema(path.stem), path)
    assert getattr(config, "output_dir", None), f"{path} must set a top-level output_dir"
