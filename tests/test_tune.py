"""`deradiff tune` end to end on tiny random models (seconds), and the pieces it is built from."""

from __future__ import annotations

import json
from html import escape as html_escape
import math
import re
from pathlib import Path

import pytest
import torch

import deradiff
from deradiff.cli import main
from deradiff.config import load_config
from deradiff.errors import ConfigError
from deradiff.eval import metrics
from deradiff.eval.generate import make_jobs, sample_variant
from deradiff.eval.sampler import SampleSettings
from deradiff.eval.scoring import pixel_features
from deradiff.eval.variants import Variant
from deradiff.models.pipelines import load_lora
from deradiff.testing import save_random_lora, tiny_sd_pipeline
from deradiff.training.tracking import RecordingTracker
from deradiff.tuning.config import TuneConfig
from deradiff.tuning.measure import weighted_kid
from deradiff.eval.generate import sample_lambdas
from deradiff.tuning.search import dense_grid, refine_grid
from deradiff.tuning.select import choose
from deradiff.eval.plan import read_lora
from deradiff.tuning.stage import format_summary, grid_lambdas, run_tune
from deradiff.tuning.tracking import tune_group

BETA0 = 0.5


@pytest.fixture(scope="module")
def anchor(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-models")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "base")
    return save_random_lora(root / "anchor", {"base_model": str(root / "base"), "method": "reward_grad", "beta": BETA0,
                                              "beta_units": "reward", "reward": "vividness"})


def _overrides(out, anchor, *extra: str) -> list[str]:
    # path KL rises with lambda, so "as much path KL as the bound allows" has a known answer: the largest lambda
    # whose whole interval is below the bound (0.666667 for this LoRA: path KL ~1470 [1300, 1670] there, ~3200 at 1)
    return [f"output_dir={out}", f"anchor_lora={anchor}", "maximize=path_kl", "subject_to=['path_kl <= 2000']",
            "prompts=[red circle, blue square]", "seeds=[0, 1, 2]", "sampling.steps=3", "search.num_lambdas=4",
            "search.lambda_max=2", "search.refine_lambdas=2", "rewards=[vividness]", "kid_features=pixels", "grid_seeds=3",
            "bootstrap.replicates=50", "tracker.backend=none", *extra]


def _config(out, anchor, *extra: str) -> TuneConfig:
    return load_config(TuneConfig, None, _overrides(out, anchor, *extra))


@pytest.fixture(scope="module")
def finished(anchor, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-out") / "run"
    trackers: dict[str, RecordingTracker] = {}
    cfg = _config(out, anchor, "tracker.backend=wandb", "tracker.mode=offline")
    result = run_tune(cfg, features=pixel_features, tracker_factory=lambda s, o, name: trackers.setdefault(name, RecordingTracker()))
    return out, result, trackers


# ---- pure pieces -----------------------------------------------------------------------------------------
def test_dense_grid_is_even_and_always_has_base_and_anchor():
    assert dense_grid(0.25, 2.0, 8) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert dense_grid(0.0, 3.0, 4) == [0.0, 1.0, 2.0, 3.0]


def test_refine_grid_fills_between_the_neighbours_of_the_center():
    explored = [0.0, 0.5, 1.0, 1.5, 2.0]
    assert refine_grid(explored, 1.0, 3) == [0.666667, 0.833333, 1.25]  # two on the left, one on the right
    assert refine_grid(explored, 1.0, 2) == [0.75, 1.25]
    assert refine_grid(explored, 2.0, 4) == [1.6, 1.7, 1.8, 1.9]  # at the end: one side only
    assert refine_grid(explored, 0.1, 1) == [0.25]  # centered on the nearest explored lambda, 0
    assert refine_grid(explored, 1.0, 0) == []


def test_weighted_kid_with_unit_weights_is_the_paired_kid():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen) + 0.5
    k = metrics.polynomial_kernel
    got = weighted_kid(k(x, x), k(y, y), k(x, y), torch.ones(6, dtype=torch.float64))
    assert got == pytest.approx(metrics.kid(x, y, paired=True), rel=1e-12)
    # a sample drawn twice counts twice, but never pairs with itself: weights (2, 1, ...) != unit weights
    twice = weighted_kid(k(x, x), k(y, y), k(x, y), torch.tensor([2.0, 1, 1, 1, 1, 0], dtype=torch.float64))
    assert math.isfinite(twice) and twice != pytest.approx(got)


def test_grid_rows_keep_base_anchor_and_choice():
    lams = [0.0, 0.25, 0.5, 0.62, 0.75, 1.0, 1.5, 2.0]
    rows = grid_lambdas(lams, 0.62, 5)
    assert {0.0, 1.0, 0.62} <= set(rows) and len(rows) == 5 and rows == sorted(rows)
    assert grid_lambdas(lams, None, 20) == lams


# ---- the batched lambda sweep ----------------------------------------------------------------------------
def test_one_batched_sweep_equals_the_eval_sampling_each_lambda_alone(anchor):
    """Every lambda of one batch of trajectories gets the images and path KL the eval's realigned variant gets
    alone (same shared noise); lambda 0 is the base, path KL 0."""
    pipe = tiny_sd_pipeline(seed=0)
    load_lora(pipe, anchor)
    jobs = make_jobs(["red circle", "blue square"], [0, 1])
    settings = SampleSettings(steps=3, eta=1.0, guidance_scale=2.0)
    swept = sample_lambdas(pipe, [0.0, 0.5, 1.0, 2.0], jobs, settings, batch_size=64)
    for lam in (0.0, 0.5, 1.0, 2.0):
        kind = {0.0: "base", 1.0: "retrained"}.get(lam, "realigned")
        alone = sample_variant(pipe, Variant("v", kind, anchor, "dpo", BETA0, None if kind != "realigned" else lam),
                               jobs, settings, batch_size=4)
        torch.testing.assert_close(swept[lam].images, alone.images, atol=1e-5, rtol=0)
        torch.testing.assert_close(swept[lam].path_kl, alone.path_kl, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(swept[0.0].path_kl) == 0 and (swept[2.0].path_kl > swept[0.5].path_kl).all()
    assert not hasattr(pipe.unet, "use_trajectories")  # left unrealigned


# ---- the stage -------------------------------------------------------------------------------------------
def test_tune_writes_every_output_and_its_choice_follows_the_rule(finished):
    out, result, _ = finished
    saved = json.loads((out / "tune.json").read_text())
    lams = [r["lambda"] for r in saved["rows"]]
    assert lams == sorted(lams) and {0.0, 1.0} <= set(lams)
    assert {r["pass"] for r in saved["rows"]} == {"dense", "refine"}
    for row in saved["rows"]:
        for m in ("vividness", "vividness_delta", "path_kl", "diversity", "diversity_delta", "kid", "objective"):
            assert row[f"{m}_lo"] <= row[m] + 1e-9 and row[m] <= row[f"{m}_hi"] + 1e-9, (row["lambda"], m)
    by_lambda = {r["lambda"]: r for r in saved["rows"]}
    for row in saved["rows"]:  # deltas are paired differences to the base: exact on the point estimates
        assert row["vividness_delta"] == pytest.approx(row["vividness"] - by_lambda[0.0]["vividness"], abs=1e-12)
    assert by_lambda[0.0]["vividness_delta_lo"] == by_lambda[0.0]["vividness_delta_hi"] == 0.0
    again = choose(saved["rows"], _config(out, "x").criterion(), BETA0)  # the rule, applied to the saved table
    assert saved["choice"]["lambda"] == again.lam == result.choice["lambda"] == 0.666667
    assert max(r["lambda"] for r in saved["rows"] if r["path_kl_hi"] <= 2000) == 0.666667
    assert saved["choice"]["beta"] == pytest.approx(BETA0 / again.lam)
    assert all(r["feasible"] == (r["lambda"] in again.feasible) for r in saved["rows"])
    for name in ("tune.html", "tune.csv", *saved["plots"], *(g["path"] for g in saved["grids"])):
        assert (out / name).is_file(), name
    assert saved["cost"]["lambdas_explored"] == len(lams) - 2 and saved["cost"]["ratio"] is None  # no training time known
    html = (out / "tune.html").read_text()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", saved["meta"]["date"]) and f"measured {saved['meta']['date']}" in html
    assert "95% bootstrap intervals" in html
    assert f"{saved['choice']['lambda']:.4g}" in html and html_escape(saved['choice']['reason']) in html and "red circle" in html


def test_tune_logs_one_run_with_a_step_per_lambda(finished):
    out, result, trackers = finished
    run = trackers["tune"]
    rows = result.results["rows"]
    assert run.config["kind"] == "tune" and run.config["criterion"] == "maximize path_kl subject to path_kl <= 2000"
    assert [step for step, _ in run.scalars] == list(range(len(rows)))
    assert run.series("lambda") == [r["lambda"] for r in rows]
    assert run.summary["chosen_lambda"] == result.choice["lambda"]


def test_same_config_and_seed_give_the_same_tune(finished, anchor, tmp_path):
    out, result, _ = finished
    again = run_tune(_config(tmp_path / "again", anchor), features=pixel_features)
    assert again.results["rows"] == result.results["rows"]
    assert again.choice == result.choice


def test_refuses_to_replace_a_finished_tune_unless_told(finished, anchor, capsys):
    out, _, _ = finished
    before = (out / "tune.json").read_bytes()
    assert main(["tune", *_cli(out, anchor)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overwrite" in err[0]
    assert (out / "tune.json").read_bytes() == before


SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "tune.yaml"


def _cli(out, anchor, *extra: str) -> list[str]:
    """The CLI's arguments: the shipped tiny YAML with this test's settings over it."""
    return ["--config", str(SHIPPED), *_overrides(out, anchor, *extra)]


def test_cli_reports_an_unmet_criterion_with_exit_3_and_writes_the_table(anchor, tmp_path, capsys):
    out = tmp_path / "infeasible"
    assert main(["tune", *_cli(out, anchor, "subject_to=['path_kl <= -1']")]) == 3
    text = capsys.readouterr().out
    assert "no lambda meets the criterion" in text and "least violating is lambda 0" in text
    saved = json.loads((out / "tune.json").read_text())
    assert saved["choice"] is None and saved["infeasible"]["lambda"] == 0.0
    assert (out / "tune.html").is_file()


@pytest.mark.parametrize("bad, expected", [
    (["maximize=vividnes"], "unknown metric 'vividnes' (did you mean 'vividness'?)"),
    (["minimize=path_kl"], "has both 'maximize' and 'minimize'"),
    (["subject_to=['fidelity >> 0.8']"], "fidelity >> 0.8"),
    (["subject_to=['kid <= 0.1']", "kid_features=none"], "kid_features"),
    (["search.lambda_max=1"], "search.lambda_max"),
    (["bootstrap.replicates=0"], "bootstrap.replicates"),
    (["seeds=[3]"], "seeds"),
])
def test_bad_input_is_one_line_before_any_work(bad, expected, anchor, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["tune", *_cli(out, anchor, *bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_criterion_metrics_are_checked_when_the_config_loads(anchor, tmp_path):
    with pytest.raises(ConfigError, match="unknown metric 'sharpness'"):
        _config(tmp_path, anchor, "maximize=1.0*vividness + 0.5*sharpness")


# ---- the Python API --------------------------------------------------------------------------------------
def test_python_api_matches_the_stage_on_the_same_inputs(finished, anchor):
    _, result, _ = finished
    pipe = tiny_sd_pipeline(seed=0)
    load_lora(pipe, anchor)
    tuned = deradiff.tune(pipe, "path_kl", subject_to=["path_kl <= 2000"], prompts=["red circle", "blue square"],
                          seeds=[0, 1, 2], features=pixel_features, sampling={"steps": 3},
                          search={"num_lambdas": 4, "lambda_max": 2, "refine_lambdas": 2}, bootstrap={"replicates": 50})
    assert tuned.choice.lam == result.choice["lambda"] and tuned.choice.beta == pytest.approx(BETA0 / tuned.choice.lam)
    assert [r["lambda"] for r in tuned.rows] == [r["lambda"] for r in result.results["rows"]]
    assert tuned.rows[3]["path_kl"] == pytest.approx(result.results["rows"][3]["path_kl"], rel=1e-6)


def test_python_api_on_a_two_model_pair(anchor):
    """The base pipeline plus a separate aligned UNet (two-model mode) tunes like the LoRA pipeline."""
    lora_pipe = tiny_sd_pipeline(seed=0)
    load_lora(lora_pipe, anchor)
    kwargs = dict(prompts=["red circle"], seeds=[0, 1], sampling={"steps": 2}, bootstrap={"replicates": 20},
                  search={"num_lambdas": 3, "lambda_max": 2, "refine_lambdas": 0}, beta=BETA0)
    with_lora = deradiff.tune(lora_pipe, "vividness", **kwargs)
    aligned = tiny_sd_pipeline(seed=0)
    load_lora(aligned, anchor)
    aligned.fuse_lora()
    aligned.unload_lora_weights()
    pair = deradiff.tune(tiny_sd_pipeline(seed=0), "vividness", aligned_unet=aligned.unet, **kwargs)
    for a, b in zip(with_lora.rows, pair.rows):
        assert a["vividness"] == pytest.approx(b["vividness"], abs=1e-4)
    assert pair.choice.lam == with_lora.choice.lam


def test_python_api_rejects_bad_input_in_one_line(anchor):
    pipe = tiny_sd_pipeline(seed=0)
    load_lora(pipe, anchor)
    with pytest.raises(ConfigError, match="unknown metric 'vivid'"):
        deradiff.tune(pipe, "vivid", prompts=["red circle"])
    with pytest.raises(deradiff.errors.DeradiffError, match="2 distinct seeds"):
        deradiff.tune(pipe, "vividness", prompts=["red circle"], seeds=[1, 1])
    with pytest.raises(deradiff.errors.DeradiffError, match="search has no key 'lambda_mx'"):
        deradiff.tune(pipe, "vividness", prompts=["red circle"], search={"lambda_mx": 3})


# ---- verify: train once more at the chosen strength ------------------------------------------------------
def test_verify_needs_the_anchors_training_config_before_any_sampling(anchor, tmp_path, capsys):
    out = tmp_path / "no-config"
    assert main(["tune", *_cli(out, anchor, "verify=true")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_config.yaml" in err[0] and "verify=false" in err[0]
    assert not (out / "tune.json").exists()


def test_verify_sets_its_own_settings_on_the_loaded_config_and_checks_them(tmp_path):
    """Was: the beta, folder, resume and overwrite went in as formatted key=value overrides."""
    from deradiff.config import save_config
    from deradiff.training.config import RewardGradConfig
    from deradiff.tuning.verify import RetrainPlan, retrain_config

    anchor = load_config(RewardGradConfig, None, [f"output_dir={tmp_path / 'anchor'}", "reward_grad.prompts=[red]",
                                                  "reward_grad.beta=0.5", "tracker.backend=wandb"])
    save_config(anchor, tmp_path / "train_config.yaml")
    cfg = load_config(TuneConfig, None, [f"output_dir={tmp_path / 'tune'}", f"anchor_lora={tmp_path / 'anchor'}",
                                         "maximize=vividness", "verify_overrides=[train.max_steps=7]", "overwrite=true",
                                         "tracker.backend=none"])
    plan = RetrainPlan("reward_grad", tmp_path / "train_config.yaml", tmp_path / "tune" / "verify")
    got = retrain_config(cfg, plan, 0.25)
    assert (got.output_dir, got.reward_grad.beta, got.reward_grad.prompts) == (str(plan.output_dir), 0.25, ["red"])
    assert (got.train.max_steps, got.train.resume_from, got.train.overwrite, got.tracker) == (7, "latest", True, cfg.tracker)
    with pytest.raises(ConfigError, match="reward_grad.beta"):  # checked as if typed by a user
        retrain_config(cfg, plan, -1.0)


@pytest.mark.slow  # ~15 s (two trainings, two tunes); verify's refusal without a config stays in the default suite
def test_verify_trains_at_the_chosen_beta_and_compares_on_the_same_noise(tiny_base, tmp_path):
    from deradiff.models.pipelines import read_lora_metadata
    from deradiff.training.config import RewardGradConfig
    from deradiff.training.reward_grad import run_reward_grad

    train = load_config(RewardGradConfig, None, [
        f"output_dir={tmp_path / 'anchor'}", f"model.pretrained={tiny_base}", "reward_grad.prompts=[red, blue]",
        "reward_grad.beta=0.5", "sample.num_steps=3", "sample.guidance_scale=2.0", "train.micro_batch_size=2",
        "train.max_steps=3", "train.checkpoint_every=0", "optim.lr=0.01", "tracker.backend=none"])
    anchor = run_reward_grad(train)["lora_dir"]
    settings = ["prompts=[red, blue]", "seeds=[0, 1, 2]", "sampling.steps=3", "sampling.guidance_scale=2.0",
                "search.num_lambdas=5", "search.lambda_max=2", "search.refine_lambdas=2", "kid_features=pixels",
                "bootstrap.replicates=50", "tracker.backend=none", "maximize=path_kl", "oracle.enabled=on",
                "oracle.samples_per_prompt=8", "oracle.min_ess=1", f"oracle.cache_dir={tmp_path / 'cache'}"]
    probe = run_tune(load_config(TuneConfig, None, [f"output_dir={tmp_path / 'probe'}", f"anchor_lora={anchor}", *settings]))
    bound = next(r["path_kl_hi"] for r in probe.results["rows"] if r["lambda"] == 0.5) * 1.0001  # lambda* = 0.5
    cfg = load_config(TuneConfig, None, [f"output_dir={tmp_path / 'tune'}", f"anchor_lora={anchor}", *settings,
                                         f"subject_to=['path_kl <= {bound}']", "verify=true"])
    result = run_tune(cfg)
    assert result.choice["lambda"] == 0.5
    assert tune_group(cfg, read_lora(str(anchor), "anchor_lora")) == "train-anchor"
    verify = result.results["verify"]
    meta = read_lora_metadata(verify["lora_dir"])
    assert meta["beta"] == pytest.approx(1.0) and verify["beta"] == pytest.approx(1.0)  # beta0 / lambda* = 0.5 / 0.5
    assert meta["wandb_group"] == "train-anchor"  # verify's run logs in the anchor's group (an argument, not env)
    rows = {m["metric"]: m for m in verify["metrics"]}
    assert set(rows) == {"vividness", "path_kl", "diversity", "kid", "kl_to_optimum", "objective"}
    chosen = next(r for r in result.results["rows"] if r["lambda"] == 0.5)
    assert rows["path_kl"]["realigned"] == pytest.approx(chosen["path_kl"])  # the same draws as the table
    for m in rows.values():
        assert m["difference"] == pytest.approx(m["realigned"] - m["retrained"], abs=1e-9)
        assert m["difference_lo"] <= m["difference"] + 1e-9 <= m["difference_hi"] + 2e-9
        assert m["verdict"] == ("indistinguishable" if m["difference_lo"] <= 0 <= m["difference_hi"] else
                                "realigned higher" if m["difference_lo"] > 0 else "realigned lower")
    assert "verify (realigned - retrained at beta 1)" in format_summary(result)


def test_thin_script_runs_the_same_command():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "eval" / "tune.py"), "--help"], capture_output=True, text=True,
                          cwd=root, timeout=120)
    assert done.returncode == 0 and "subject_to" in done.stdout and "Exit status 3" in done.stdout


# ---- the oracle in the criterion -------------------------------------------------------------------------
def _reward_anchor(root, base) -> str:
    meta = {"base_model": str(base), "method": "reward_grad", "beta": BETA0, "beta_units": "reward", "reward": "vividness",
            "sampler": {"num_steps": 3, "eta": 1.0, "guidance_scale": 1.0}}
    return save_random_lora(root / "reward-anchor", meta, scale=0.05)


def test_oracle_metrics_are_the_exact_optimum_at_each_strength(anchor, tmp_path):
    """kl_to_optimum and oracle_<metric> come from importance-weighted base samples: oracle_vividness at lambda
    is the prompt mean of sum_i softmax(r_i * lambda / beta0) r_i over the cached base samples (hand formula)."""
    from safetensors.torch import load_file

    from deradiff.rewards import get_reward

    ref = _reward_anchor(tmp_path, Path(anchor).parent / "base")
    cfg = load_config(TuneConfig, None, [
        f"output_dir={tmp_path / 'tune'}", f"anchor_lora={ref}", "maximize=vividness",
        "subject_to=['kl_to_optimum <= 50', 'oracle_fidelity >= 0']",  # fidelity is scored because an oracle metric reads it
        "prompts=[red circle, blue square]", "seeds=[0, 1, 2]", "sampling.steps=3", "search.num_lambdas=4",
        "search.lambda_max=2", "search.refine_lambdas=0", "kid_features=none", "bootstrap.replicates=30",
        "oracle.samples_per_prompt=12", "oracle.min_ess=1", f"oracle.cache_dir={tmp_path / 'cache'}", "tracker.backend=none"])
    result = run_tune(cfg)
    rows = {r["lambda"]: r for r in result.results["rows"]}
    assert rows[0.0]["kl_to_optimum"] == 0.0 and rows[0.0]["oracle_vividness"] == rows[0.0]["vividness"]
    images = load_file(str(next((tmp_path / "cache").glob("*.safetensors"))))["images"].float()
    reward = get_reward("vividness")(images, ["red circle"] * 12 + ["blue square"] * 12).double().view(2, 12)
    for lam in (0.666667, 2.0):
        weights = torch.softmax(reward * lam / BETA0, dim=1)
        expected = float((weights * reward).sum(1).mean())
        assert rows[lam]["oracle_vividness"] == pytest.approx(expected, rel=1e-6)
        assert rows[lam]["kl_to_optimum_lo"] <= rows[lam]["kl_to_optimum"] <= rows[lam]["kl_to_optimum_hi"]
        assert rows[lam]["feasible"] == (rows[lam]["kl_to_optimum_hi"] <= 50)
        assert 0 <= rows[lam]["oracle_fidelity_lo"] <= rows[lam]["oracle_fidelity"] <= rows[lam]["oracle_fidelity_hi"] <= 1


def test_an_oracle_metric_needs_a_reward_unit_anchor_sampled_as_trained(anchor, tmp_path, capsys):
    out = tmp_path / "no-oracle"
    assert main(["tune", *_cli(out, anchor, "subject_to=['kl_to_optimum <= 1']")]) == 2  # a DPO-style anchor
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kl_to_optimum" in err[0] and "no oracle" in err[0]
    assert not (out / "tune.json").exists()
    with pytest.raises(ConfigError, match="oracle.enabled' is off"):
        _config(tmp_path, anchor, "maximize=oracle_vividness", "oracle.enabled=off")
