"""The eval's oracle rows, intervals and verdict on tiny random models with reward-unit betas (seconds)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from deradiff.config import load_config
from deradiff.errors import DeradiffError
from deradiff.eval.stage import run_eval
from deradiff.eval.config import EvalConfig
from deradiff.testing import save_random_lora, tiny_sd_pipeline
from deradiff.training.tracking import RecordingTracker

BETA0 = 0.05
SAMPLER = {"num_steps": 4, "eta": 1.0, "guidance_scale": 1.0}


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def _lora(base_dir, out_dir, beta: float, scale: float, method: str = "ddpo") -> str:
    meta = {"base_model": str(base_dir), "method": method, "beta": beta}
    if method == "ddpo":
        meta.update({"beta_units": "reward", "reward": "brightness", "sampler": SAMPLER})
    return save_random_lora(out_dir, meta, scale)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle-models")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "base")
    loras = {"anchor": _lora(root / "base", root / "anchor", BETA0, 1.0),
             "retrained": [_lora(root / "base", root / f"b{b:g}", b, BETA0 / b) for b in (0.025, 0.1)],
             "dpo": _lora(root / "base", root / "dpo", BETA0, 1.0, method="dpo")}
    return root, loras


def _config(root, out, anchor, retrained, *extra: str) -> EvalConfig:
    overrides = [f"output_dir={out}", f"anchor_lora={anchor}", f"retrained_loras={json.dumps(retrained)}",
                 "prompts=[red circle, blue square]", "seeds=[0, 1, 2, 3]", "sampling.steps=4", "extra_lambdas=[1.5]",
                 "kid_features=none", "tracker.backend=none", "oracle.samples_per_prompt=24", "oracle.min_ess=4",
                 f"oracle.cache_dir={root / 'cache'}", "bootstrap.replicates=200", *extra]
    return load_config(EvalConfig, None, overrides)


@pytest.fixture(scope="module")
def finished(models):
    root, loras = models
    cfg = _config(root, root / "run", loras["anchor"], loras["retrained"], "tracker.backend=wandb", "tracker.mode=offline")
    trackers: dict[str, RecordingTracker] = {}
    result = run_eval(cfg, rewards={"brightness": brightness}, features=None,
                      tracker_factory=lambda section, output_dir, name: trackers.setdefault(name, RecordingTracker()))
    return cfg, result, trackers


def test_oracle_rows_at_every_evaluated_strength(finished):
    _, result, _ = finished
    rows = result.results["models"]
    oracle = {r["effective_beta"]: r for r in rows if r["kind"] == "oracle"}
    strengths = {r["effective_beta"] for r in rows if r["kind"] in ("retrained", "realigned", "weight_scaled")}
    assert set(oracle) == strengths and len(oracle) == 4  # 0.025, 0.05, 0.1 and beta0 / 1.5
    for beta, row in oracle.items():
        assert row["name"] == f"oracle-b{beta:g}" and 1 <= row["ess"] <= 24
        for key in ("reward_brightness", "path_kl", "diversity"):
            assert row[f"{key}_lo"] <= row[key] <= row[f"{key}_hi"], (key, row)
    # stronger tilt (smaller beta): higher reward, farther from base, fewer effective samples
    ordered = [oracle[b] for b in sorted(oracle)]
    assert [r["reward_brightness"] for r in ordered] == sorted((r["reward_brightness"] for r in ordered), reverse=True)
    assert [r["ess"] for r in ordered] == sorted(r["ess"] for r in ordered)


def test_oracle_numbers_equal_an_explicit_reweighting_of_the_cached_base_samples(finished):
    cfg, result, _ = finished
    cache = result.results["meta"]["oracle"]["cache"]
    images = load_file(cache)["images"].float()
    images = images.view(2, 24, *images.shape[1:])
    beta = 0.025
    row = next(r for r in result.results["models"] if r["name"] == f"oracle-b{beta:g}")
    rewards, kls = [], []
    for p in range(2):
        r = [float(x) for x in images[p].mean(dim=(1, 2, 3))]
        w = [math.exp(x / beta) for x in r]
        mean_r = sum(wi * x for wi, x in zip(w, r)) / sum(w)
        rewards.append(mean_r)
        kls.append(mean_r / beta - math.log(sum(w) / len(w)))
    assert row["reward_brightness"] == pytest.approx(sum(rewards) / 2, rel=1e-6)
    assert row["path_kl"] == pytest.approx(sum(kls) / 2, rel=1e-6, abs=1e-7)


def test_every_model_number_has_an_interval_and_the_verdict_reads_them(finished):
    cfg, result, _ = finished
    res = result.results
    for row in res["models"]:
        for key in res["meta"]["metric_keys"]:
            if math.isfinite(row[key]) and row["kind"] != "base":
                assert row[f"{key}_lo"] <= row[key] + 1e-12 and row[key] <= row[f"{key}_hi"] + 1e-12, (row["name"], key)
    for row in res["models"]:
        if row["kind"] in ("retrained", "realigned", "weight_scaled"):
            assert "kl_to_optimum" in row
    verdict = res["verdict"]
    assert verdict[0].startswith("Intervals: 95% bootstrap over 2 prompts x 4 seeds (200 paired resamples)")
    assert any(line.startswith("reward_brightness vs retrained:") for line in verdict)
    assert any(line.startswith("reward_brightness vs oracle:") for line in verdict)
    assert any(line.startswith("retrained-b0.025 vs its optimum oracle-b0.025") for line in verdict)
    closer = [line for line in verdict if line.startswith("realigned-l2 vs retrained-b0.025, KL to the optimum")]
    assert len(closer) == 1 and closer[0].endswith(("is closer", "indistinguishable")), closer
    for c in res["comparisons"]:
        excludes = c["difference_lo"] > 0 or c["difference_hi"] < 0
        assert (c["verdict"] == "indistinguishable") == (not excludes), c
    assert {g["kind"] for g in res["oracle_gaps"]} == {"retrained", "realigned", "weight_scaled"}
    page = result.report.read_text()
    assert "Verdict" in page and verdict[1] in page.replace("&#x27;", "'")
    table = pd.read_csv(cfg.output_dir + "/results.csv")
    assert {"ess", "reward_brightness_lo", "kl_to_optimum"} <= set(table.columns) and (table["kind"] == "oracle").sum() == 4


def test_oracle_rows_and_the_verdict_reach_the_tracker(finished):
    _, result, trackers = finished
    for row in (r for r in result.results["models"] if r["kind"] == "oracle"):
        run = trackers[f"eval-{row['name']}"]
        assert run.config["kind"] == "oracle" and run.finished
        assert dict(run.scalars[0][1])["ess"] == pytest.approx(row["ess"])
    report = trackers["eval-report"]
    assert report.config["verdict"] == result.results["verdict"]
    assert any(k.startswith("error_difference/oracle/mean/") for _, v in report.scalars for k in v)


def test_second_run_reuses_the_cached_base_samples(finished, models, tmp_path):
    root, loras = models
    cfg, first, _ = finished
    again = run_eval(_config(root, tmp_path / "again", loras["anchor"], loras["retrained"]), rewards={"brightness": brightness}, features=None)
    assert again.results["meta"]["oracle"]["from_cache"] is True and first.results["meta"]["oracle"]["from_cache"] is False
    pick = lambda res: [r for r in res["models"] if r["kind"] == "oracle"]  # noqa: E731
    for a, b in zip(pick(again.results), pick(first.results), strict=True):  # same samples, same bootstrap seed
        assert a.keys() == b.keys()  # float32 reward sums may round differently: numbers to 1e-6
        for k in a:
            assert a[k] == (pytest.approx(b[k], rel=1e-6, abs=1e-7) if isinstance(a[k], float) else b[k]), k


def test_dpo_anchor_gets_no_oracle_and_says_why(models, tmp_path):
    root, loras = models
    cfg = _config(root, tmp_path / "dpo", loras["dpo"], [], "lambdas=[2.0]")
    res = run_eval(cfg, rewards={"brightness": brightness}, features=None).results
    assert not [r for r in res["models"] if r["kind"] == "oracle"]
    assert "not in reward units" in res["meta"]["oracle"]["status"]
    assert any("no oracle" in line for line in res["verdict"])


def test_oracle_on_fails_before_sampling_when_it_cannot_apply(models, tmp_path):
    root, loras = models
    cfg = _config(root, tmp_path / "on", loras["anchor"], loras["retrained"], "oracle.enabled=on", "sampling.steps=6")
    with pytest.raises(DeradiffError, match="trained with"):
        run_eval(cfg, rewards={"brightness": brightness}, features=None)
    assert not (tmp_path / "on" / "results.json").exists()


def test_too_few_effective_samples_print_unreliable_and_stay_out_of_the_verdict(models, tmp_path):
    root, loras = models
    cfg = _config(root, tmp_path / "noisy", loras["anchor"], loras["retrained"], "oracle.min_ess=1000")
    res = run_eval(cfg, rewards={"brightness": brightness}, features=None)
    rows = [r for r in res.results["models"] if r["kind"] == "oracle"]
    assert rows and not any(r["reliable"] for r in rows)
    page = res.report.read_text()
    assert page.count("unreliable (ESS ") >= len(rows)
    assert not res.results["oracle_gaps"] and not [c for c in res.results["comparisons"] if c["reference"] == "oracle"]
    assert sum("unreliable (ESS" in line for line in res.results["verdict"]) == len(rows)


def test_oracle_betas_meet_retrained_betas_despite_float_rounding():
    from deradiff.eval.plan import LoraInfo, plan_variants
    from deradiff.eval.validation import oracle_betas

    anchor, retrained = LoraInfo("a", 0.08, "reward_grad", None), [LoraInfo("r", 0.1, "reward_grad", None)]
    variants = plan_variants(anchor, retrained, [0.8, 2.0], weight_scaled=True)
    assert 0.08 / 0.8 != 0.1 and oracle_betas(variants) == pytest.approx([0.04, 0.08, 0.1]) and len(oracle_betas(variants)) == 3

