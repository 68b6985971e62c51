"""The shipped tiny-world study end to end (slow: ~10 min on 2 CPU cores): the must-show claims, on real training.

Run with `pytest -m slow tests/test_study_tiny.py`. Needs the embedded tiny world (`deradiff tiny pretrain`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from deradiff import study
from deradiff.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from deradiff.world import TINY_MODEL_DIR

    if not (Path(TINY_MODEL_DIR) / "model_index.json").is_file():
        pytest.skip("the embedded tiny world is not built (deradiff tiny pretrain)")
    out = tmp_path_factory.mktemp("tiny-study") / "study"
    cfg = load_config(study.StudyConfig, "configs/tiny/study.yaml", [f"output_dir={out}", "tracker.backend=none"])
    return cfg, study.run_study(cfg)


def test_retrained_reward_falls_as_beta_grows_and_realigned_follows(tiny_study):
    _, result = tiny_study
    found = result.summary["findings"]
    assert found["retrained"]["falls_as_beta_grows"], found["retrained"]
    assert found["realigned"]["falls_as_beta_grows"], found["realigned"]


def test_report_has_its_images_and_every_number_from_the_run(tiny_study):
    cfg, result = tiny_study
    page = result.report.read_text()
    results = json.loads((Path(cfg.output_dir) / "eval" / "results.json").read_text())
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(results["plots"]) + len(results["grids"]) > 0
    saved = load_file(str(Path(cfg.output_dir) / "eval" / "samples.safetensors"))
    table = pd.read_csv(Path(cfg.output_dir) / "eval" / "results.csv").set_index("name")
    for name in table.index:
        assert table.loc[name, "path_kl"] == pytest.approx(float(saved[f"{name}/path_kl"].mean()), rel=1e-5)
    markers = {p.stem: json.loads(p.read_text())["seconds"] for p in (Path(cfg.output_dir) / "stages").glob("*.json")}
    assert {s["stage"]: s["seconds"] for s in result.summary["accounting"]["stages"]} == markers
