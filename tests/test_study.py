"""The study: stage caching/resume, compute accounting by hand, and a fast end-to-end run on tiny random models
with a stand-in trainer (the real tiny-world study is the slow test in test_study_tiny.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from deradiff import study
from deradiff.config import load_config
from deradiff.models.lora import attach_lora, save_lora
from deradiff.models.pipelines import read_lora_metadata
from deradiff.testing import tiny_sd_pipeline
from deradiff.training.config import DPOConfig
from deradiff.training.registry import TrainerSpec

BETA0 = 500.0


def test_run_stage_skips_done_stages_and_reruns_changed_ones(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"n": len(calls)}

    first = study.run_stage(tmp_path, "s", {"a": 1}, fn)
    again = study.run_stage(tmp_path, "s", {"a": 1}, fn)
    assert (first.skipped, again.skipped, again.result, again.seconds) == (False, True, {"n": 1}, first.seconds)
    assert study.run_stage(tmp_path, "s", {"a": 2}, fn).result == {"n": 2}
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["s.json"]  # no temp files left


def test_interrupted_stage_writes_no_marker_and_reruns(tmp_path):
    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.run_stage(tmp_path, "s", {}, boom)
    assert not (tmp_path / "stages" / "s.json").exists()
    assert study.run_stage(tmp_path, "s", {}, lambda: {"ok": True}).skipped is False


def test_savings_table_by_hand():
    (row,) = study.savings_table([10.0, 10.0], retrained_img_s=0.1, realigned_img_s=0.2, images=10, sweep_sizes=[3])
    assert row["savings_training"] == pytest.approx(2 / 3)  # paper: 66.7% at K=3
    assert row["retrain_with_sampling_s"] == pytest.approx(33.0)
    assert row["realign_with_sampling_s"] == pytest.approx(16.0)
    assert row["savings_with_sampling"] == pytest.approx(1 - 16 / 33)
    ten = study.savings_table([5.0], 0.0, 0.0, 1, [10])[0]
    assert ten["savings_training"] == pytest.approx(0.9)


def test_shipped_study_configs_load():
    for path in Path("configs").glob("*/study*.yaml"):
        cfg = load_config(study.StudyConfig, path)
        assert cfg.beta0 not in cfg.betas, path


# ---- fast end to end ------------------------------------------------------------------------------------
def _fake_trainer(base_dir: Path):
    """Stands in for DPO: the LoRA moves the model along one fixed direction, by beta0/beta (weaker KL, further)."""

    def run(cfg: DPOConfig, tracker=None, group=None, job_type=None) -> dict:
        pipe = tiny_sd_pipeline(seed=0)
        attach_lora(pipe.unet, rank=4)
        gen = torch.Generator().manual_seed(3)
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=gen) * 0.3 * BETA0 / cfg.dpo.beta
        meta = {"base_model": str(base_dir), "method": "dpo", "beta": cfg.dpo.beta, "wandb_group": group,
                "job_type": job_type}
        lora = save_lora(pipe.unet, Path(cfg.output_dir) / "lora", meta)
        return {"lora_dir": str(lora), "wall_s": 0.0}

    return TrainerSpec("dpo", DPOConfig, run, None, "fake")


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "base")
    mp = pytest.MonkeyPatch()
    mp.setattr(study, "trainer_spec", lambda method: _fake_trainer(root / "base"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    overrides = [f"output_dir={root / 'run'}", f"beta0={BETA0}", "betas=[250.0, 1000.0]", "make_prefs=false",
                 "tracker.backend=none",
                 'eval_overrides=["prompts=[red circle, blue square]", "seeds=[0,1,2]", "sampling.steps=4", '
                 '"rewards=[vividness]", "kid_features=pixels", "extra_lambdas=[1.5]", "bootstrap.replicates=100"]']
    cfg = load_config(study.StudyConfig, "configs/tiny/study_dpo.yaml", overrides)
    try:
        first = study.run_study(cfg)
        second = study.run_study(cfg)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return cfg, first, second


def test_study_report_exists_with_its_images_and_accounting(finished_study):
    cfg, first, _ = finished_study
    page = first.report.read_text()
    assert first.report == Path(cfg.output_dir) / "report.html"
    results = json.loads((Path(cfg.output_dir) / "eval" / "results.json").read_text())
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(results["plots"]) + len(results["grids"])
    assert "Compute accounting" in page and "Study findings" in page


def test_every_accounting_number_comes_from_the_stage_markers(finished_study):
    cfg, first, _ = finished_study
    acc = json.loads((Path(cfg.output_dir) / "summary.json").read_text())["accounting"]
    markers = {p.stem: json.loads(p.read_text()) for p in (Path(cfg.output_dir) / "stages").glob("*.json")}
    assert {s["stage"] for s in acc["stages"]} == set(markers)
    for s in acc["stages"]:
        assert s["seconds"] == markers[s["stage"]]["seconds"]
        assert s["device_hours"] == pytest.approx(s["seconds"] / 3600)
    assert acc["train_seconds"] == [markers[f"train-dpo-beta{b:g}"]["seconds"] for b in (500, 250, 1000)]
    assert [r["K"] for r in acc["savings"]] == [3, 5, 10]


def test_every_training_run_gets_the_studys_group_as_an_argument(finished_study):
    """Was: the study set WANDB_RUN_GROUP / WANDB_JOB_TYPE around its train stages."""
    _, first, _ = finished_study
    for record in (r for r in first.stages if r.name.startswith("train-")):
        meta = read_lora_metadata(record.result["lora_dir"])
        assert (meta["wandb_group"], meta["job_type"]) == ("study-run", "train")


def test_rerun_skips_every_stage(finished_study):
    _, first, second = finished_study
    assert not any(r.skipped for r in first.stages)
    assert all(r.skipped for r in second.stages)
    assert [r.seconds for r in second.stages] == [r.seconds for r in first.stages]
    assert "(done earlier)" in study.format_summary(second)


def test_findings_recorded_for_every_curve(finished_study):
    _, first, _ = finished_study
    found = first.summary["findings"]
    assert found["reward"] == "reward_vividness"
    assert found["retrained"]["effective_beta"] == [250.0, 500.0, 1000.0]
    assert found["realigned"]["effective_beta"] == pytest.approx([250.0, 1000 / 3, 500.0, 1000.0])


def test_dpo_study_says_why_it_has_no_oracle_and_opens_with_its_verdict(finished_study):
    cfg, first, _ = finished_study
    verdict = first.summary["verdict"]
    assert verdict[0].startswith("Intervals: 95% bootstrap")
    assert any("no oracle" in line and "not in reward units" in line for line in verdict)
    assert json.loads((Path(cfg.output_dir) / "summary.json").read_text())["verdict"] == verdict
    page = first.report.read_text()
    assert page.index("Verdict") < page.index("Study findings")


def test_plateau_by_hand():
    rising = [{"step": i + 1, "objective": float(i)} for i in range(40)]
    found = study.plateau(rising, "objective")
    assert found["window"] == 10 and found["change"] == pytest.approx(10.0) and found["plateaued"] is False
    flat = [{"step": i + 1, "objective": (-1.0) ** i} for i in range(40)]
    found = study.plateau(flat, "objective")
    # last 10 and the 10 before both average 0; each has variance 10/9: half-width 1.96 * sqrt(2 * 10/9 / 10)
    assert found["change"] == pytest.approx(0.0) and found["change_hi"] == pytest.approx(1.96 * (2 / 9) ** 0.5)
    assert found["plateaued"] is True
    assert study.plateau(rising[:3], "objective") is None


@pytest.mark.parametrize("method", ["reward_grad", "ddpo"])
def test_reward_unit_study_trains_and_evaluates_on_one_prompt_list_with_the_training_sampler(tmp_path, method):
    prompts = ["a large red square", "a small blue circle"]
    cfg = load_config(study.StudyConfig, "configs/tiny/study.yaml", [
        f"output_dir={tmp_path}", f"prompts={json.dumps(prompts)}", f"method={method}", f"train_config=configs/tiny/{method}.yaml"])
    tcfg = study.train_config(cfg, cfg.betas[0])
    ecfg = study.eval_config(cfg, "anchor", ["retrained"])
    assert getattr(tcfg, method).prompts == prompts and ecfg.prompts == prompts
    assert (ecfg.sampling.steps, ecfg.sampling.eta, ecfg.sampling.guidance_scale) == (
        tcfg.sample.num_steps, tcfg.sample.eta, tcfg.sample.guidance_scale)


def test_a_deleted_lora_reruns_its_stage_and_tracker_settings_rerun_nothing(tmp_path, monkeypatch):
    import shutil

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(study, "trainer_spec", lambda method: _fake_trainer(tmp_path / "base"))
    overrides = [f"output_dir={tmp_path / 'run'}", f"beta0={BETA0}", "betas=[1000.0]", "make_prefs=false",
                 "tracker.backend=none", 'train_overrides=["train.log_every=5"]',
                 'eval_overrides=["prompts=[red circle]", "seeds=[0,1]", "sampling.steps=2", "rewards=[vividness]", '
                 '"kid_features=none", "extra_lambdas=[]", "bootstrap.replicates=0"]']
    cfg = load_config(study.StudyConfig, "configs/tiny/study_dpo.yaml", overrides)
    first = study.run_study(cfg)
    anchor = Path(first.stages[0].result["lora_dir"])
    shutil.rmtree(anchor)
    again = study.run_study(cfg)
    assert [r.skipped for r in again.stages] == [False, True, True] and anchor.is_dir()
    quieter = load_config(study.StudyConfig, "configs/tiny/study_dpo.yaml", [
        *overrides[:-3], "tracker.backend=wandb", "tracker.mode=disabled", 'train_overrides=["train.log_every=7"]',
        overrides[-1]])
    assert all(r.skipped for r in study.run_study(quieter).stages)


def test_a_lora_replaced_on_disk_reruns_the_eval(tmp_path, monkeypatch):
    """Was: every stage "done earlier" and the report described weights no longer on disk."""
    import shutil

    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(study, "trainer_spec", lambda method: _fake_trainer(tmp_path / "base"))
    overrides = [f"output_dir={tmp_path / 'run'}", f"beta0={BETA0}", "betas=[1000.0]", "make_prefs=false",
                 "tracker.backend=none",
                 'eval_overrides=["prompts=[red circle]", "seeds=[0,1]", "sampling.steps=2", "rewards=[vividness]", '
                 '"kid_features=none", "extra_lambdas=[]", "bootstrap.replicates=0"]']
    cfg = load_config(study.StudyConfig, "configs/tiny/study_dpo.yaml", overrides)
    first = study.run_study(cfg)
    anchor, retrained = (Path(r.result["lora_dir"]) for r in first.stages[:2])
    shutil.copy(anchor / "pytorch_lora_weights.safetensors", retrained / "pytorch_lora_weights.safetensors")
    assert [r.skipped for r in study.run_study(cfg).stages] == [True, True, False]
