"""The shipped default study end to end (slow: ~8 min on 2 CPU cores): its claims, on real DDPO training.

CI runs these after the default suite (`.ci/run`); by hand: `scripts/test.sh -m slow tests/test_study_tiny.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
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


def test_realigned_and_the_oracle_reward_fall_as_beta_grows(tiny_study):
    _, result = tiny_study
    found = result.summary["findings"]
    assert found["realigned"]["falls_as_beta_grows"], found["realigned"]
    assert found["oracle"]["falls_as_beta_grows"], found["oracle"]


def test_the_oracle_is_shown_and_reliable_at_every_evaluated_strength(tiny_study):
    cfg, result = tiny_study
    results = json.loads((Path(cfg.output_dir) / "eval" / "results.json").read_text())
    assert results["meta"]["oracle"]["status"] == "shown"
    oracle = {r["effective_beta"]: r for r in results["models"] if r["kind"] == "oracle"}
    strengths = {r["effective_beta"] for r in results["models"] if r["kind"] in ("retrained", "realigned")}
    assert set(oracle) == strengths
    assert all(r["reliable"] and r["ess"] >= results["meta"]["oracle"]["min_ess"] for r in oracle.values()), oracle


def test_every_number_has_an_interval_and_the_verdict_covers_every_metric(tiny_study):
    cfg, result = tiny_study
    results = json.loads((Path(cfg.output_dir) / "eval" / "results.json").read_text())
    for row in results["models"]:
        if row["kind"] != "base":
            for key in results["meta"]["metric_keys"]:
                assert row[f"{key}_lo"] <= row[key] + 1e-9 <= row[f"{key}_hi"] + 2e-9, (row["name"], key)
    verdict = result.summary["verdict"]
    for key in results["meta"]["metric_keys"]:
        for reference in ("retrained", "oracle"):
            assert any(line.startswith(f"{key} vs {reference}: ") for line in verdict), (key, reference)
    retrained = [r["name"] for r in results["models"] if r["kind"] == "retrained"]
    for name in retrained:
        line = next(line for line in verdict if line.startswith(f"{name} vs its optimum"))
        assert "KL to optimum" in line and "[" in line
    assert sum(line.startswith("training at beta") for line in verdict) == len(retrained)
    gaps = {(g["name"], g["metric"]) for g in results["oracle_gaps"]}
    assert {(n, "reward_vividness") for n in retrained} <= gaps and {(n, "path_kl") for n in retrained} <= gaps


def test_report_has_its_images_and_every_number_from_the_run(tiny_study):
    cfg, result = tiny_study
    page = result.report.read_text()
    results = json.loads((Path(cfg.output_dir) / "eval" / "results.json").read_text())
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(results["plots"]) + len(results["grids"]) > 0
    saved = load_file(str(Path(cfg.output_dir) / "eval" / "samples.safetensors"))
    table = pd.read_csv(Path(cfg.output_dir) / "eval" / "results.csv").set_index("name")
    for name in table.index[table["kind"] != "oracle"]:
        assert table.loc[name, "path_kl"] == pytest.approx(float(saved[f"{name}/path_kl"].mean()), rel=1e-5)
    # oracle rows: the cached base samples re-weighted by exp(vividness / beta), prompt by prompt
    from deradiff.rewards import get_reward

    base = load_file(results["meta"]["oracle"]["cache"])["images"].float()
    prompts = results["meta"]["config"]["prompts"]
    images = base.view(len(prompts), -1, *base.shape[1:])
    rewards = [get_reward("vividness")(x, [p] * len(x)).double() for x, p in zip(images, prompts)]
    for name in table.index[table["kind"] == "oracle"]:
        beta = table.loc[name, "effective_beta"]
        expected = sum(float((torch.softmax(r / beta, 0) * r).sum()) for r in rewards) / len(rewards)
        assert table.loc[name, "reward_vividness"] == pytest.approx(expected, rel=1e-5)
    markers = {p.stem: json.loads(p.read_text())["seconds"] for p in (Path(cfg.output_dir) / "stages").glob("*.json")}
    assert {s["stage"]: s["seconds"] for s in result.summary["accounting"]["stages"]} == markers
