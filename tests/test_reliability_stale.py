"""A finished or interrupted run is continued only by the training its config describes.

Resuming checks every setting that determines the weights against the checkpoint (the learning rate, the loss,
the data, the seed, ...); a difference is refused with the keys named, or the old run is discarded on request
(`train.overwrite=true`). Settings that cannot change the weights (logging, checkpoint cadence, tracker) resume
as before, and the accounted training time stays that of the run that did the work. The study's train stages
go through the same check.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from deradiff import study
from deradiff.config import load_config
from deradiff.errors import DeradiffError
from deradiff.training.checkpoint import settings_mismatch, weight_settings
from test_bad_input import assert_one_line_error
from test_reliability_helpers import lora_tensors, max_abs_diff, run_cli, tiny_assets, train_args

STEPS = "train.max_steps=4"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step DPO run (checkpoint every step) and the bytes a refused resume must leave alone."""
    from deradiff import cli

    assets = tiny_assets(tmp_path_factory.mktemp("stale"))
    out = assets["root"] / "run"
    assert cli.main(train_args(assets["config"], out, STEPS)) == 0
    return assets, out


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "wandb" not in p.parts}


@pytest.mark.parametrize("override, named", [
    ("optim.lr=0.02", "optim.lr: 0.01 -> 0.02"),
    ("dpo.loss_type=hinge", "dpo.loss_type: sigmoid -> hinge"),
    ("train.seed=6", "train.seed: 5 -> 6"),
    ("data.max_pairs=4", "data.max_pairs: None -> 4"),
])
def test_resume_under_changed_weight_settings_is_refused_with_the_key_named(finished, capsys, override, named):
    assets, out = finished
    before = _snapshot(out)
    code, _, err = run_cli(train_args(assets["config"], out, STEPS, "train.resume_from=latest", override), capsys)
    assert_one_line_error(code, err, named, "other settings", "train.overwrite=true")
    assert _snapshot(out) == before  # adapter, metadata, checkpoints and summary untouched


def test_resume_past_max_steps_is_refused(finished, capsys):
    """Was: `steps 4->2`, steps_run=-2, negative pairs/s and metadata claiming 2 steps."""
    assets, out = finished
    before = _snapshot(out)
    code, _, err = run_cli(train_args(assets["config"], out, "train.max_steps=2", "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, "at step 4", "past train.max_steps=2")
    assert _snapshot(out) == before


def test_extending_a_run_whose_schedule_depends_on_its_length_is_refused(tmp_path, capsys):
    from deradiff import cli

    assets = tiny_assets(tmp_path)
    out = tmp_path / "cosine"
    assert cli.main(train_args(assets["config"], out, STEPS, "optim.lr_scheduler=cosine")) == 0
    code, _, err = run_cli(train_args(assets["config"], out, "train.max_steps=6", "optim.lr_scheduler=cosine",
                                      "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, "train.max_steps: 4 -> 6")


def test_overwrite_discards_a_mismatched_run_and_trains_it_fresh(finished, tmp_path, capsys):
    """`resume_from=latest train.overwrite=true` under a changed lr: the result is a fresh run at that lr."""
    from deradiff import cli

    assets, _ = finished
    out = tmp_path / "run"
    assert cli.main(train_args(assets["config"], out, STEPS)) == 0
    code, outp, err = run_cli(train_args(assets["config"], out, STEPS, "train.resume_from=latest",
                                         "train.overwrite=true", "optim.lr=0.02"), capsys)
    assert code == 0, err
    assert "starting fresh" in outp
    fresh = tmp_path / "fresh"
    assert cli.main(train_args(assets["config"], fresh, STEPS, "optim.lr=0.02")) == 0
    assert max_abs_diff(lora_tensors(out), lora_tensors(fresh)) == 0.0
    assert json.loads((out / "summary.json").read_text())["steps_run"] == 4


def test_logging_and_checkpoint_settings_resume_without_retraining(finished, capsys):
    """Only where/how often to log and save changed: resumes the finished run (0 steps), same adapter, and
    the accounted training time is the original run's, not this no-op's."""
    assets, out = finished
    summary = json.loads((out / "summary.json").read_text())
    adapter = lora_tensors(out)
    code, _, err = run_cli(train_args(assets["config"], out, STEPS, "train.resume_from=latest", "train.log_every=3",
                                      "train.checkpoint_every=2", "train.keep_checkpoints=3"), capsys)
    assert code == 0, err
    after = json.loads((out / "summary.json").read_text())
    assert after["steps_run"] == 0 and after["pairs_per_s"] == 0.0
    assert max_abs_diff(lora_tensors(out), adapter) == 0.0
    assert after["train_wall_s"] == pytest.approx(summary["train_wall_s"], abs=0.1)


def test_settings_comparison_names_every_difference():
    saved = weight_settings({"optim": {"lr": 1e-3, "lr_scheduler": "constant"}, "train": {"max_steps": 4, "log_every": 1},
                             "tracker": {"backend": "wandb"}, "output_dir": "a"})
    now = weight_settings({"optim": {"lr": 2e-3, "lr_scheduler": "constant"}, "train": {"max_steps": 8, "log_every": 5},
                           "tracker": {"backend": "none"}, "output_dir": "b", "dpo": {"beta": 1.0}})
    assert settings_mismatch(saved, now) == ["dpo.beta: (not set) -> 1.0", "optim.lr: 0.001 -> 0.002"]
    assert settings_mismatch(saved, {**now, "optim.lr_scheduler": "linear"})[-1] == "train.max_steps: 4 -> 8"


# ---- the study's train stages ------------------------------------------------------------------------------
def _study(assets: dict, root: Path, *train_overrides: str) -> study.StudyConfig:
    overrides = [f"output_dir={root}", "beta0=5000", "betas=[2500]", "make_prefs=false", "tracker.backend=none",
                 f"train_config={assets['config']}", f"train_overrides={json.dumps([STEPS, *train_overrides])}"]
    return load_config(study.StudyConfig, None, overrides)


def test_study_train_stage_with_a_changed_override_refuses_then_retrains_on_request(finished, tmp_path):
    """Was: the changed stage 'resumed' the finished run (0 steps) and rewrote its metadata with the new lr."""
    assets, _ = finished
    first = study.train_stage(_study(assets, tmp_path), 5000.0, [])
    adapter = lora_tensors(Path(first.result["lora_dir"]).parent)
    with pytest.raises(DeradiffError, match=r"optim.lr: 0.01 -> 0.02.*train.overwrite=true"):
        study.train_stage(_study(assets, tmp_path, "optim.lr=0.02"), 5000.0, [])
    assert max_abs_diff(lora_tensors(Path(first.result["lora_dir"]).parent), adapter) == 0.0
    again = study.train_stage(_study(assets, tmp_path, "optim.lr=0.02", "train.overwrite=true"), 5000.0, [])
    assert not again.skipped and max_abs_diff(lora_tensors(Path(again.result["lora_dir"]).parent), adapter) > 0
    meta = json.loads((Path(again.result["lora_dir"]) / "deradiff_metadata.json").read_text())
    assert meta["steps"] == 4


def test_study_accounts_the_training_time_of_the_run_that_did_the_work(finished, tmp_path):
    """A stage marker lost after training: the rerun resumes the finished run (0 steps, same settings), and
    the accounting still uses the original training time, not the seconds of the no-op."""
    assets, _ = finished
    cfg = _study(assets, tmp_path)
    first = study.train_stage(cfg, 5000.0, [])
    (tmp_path / "stages" / f"{first.name}.json").unlink()
    second = study.train_stage(replace(cfg), 5000.0, [])
    assert not second.skipped
    assert second.result["train_wall_s"] == pytest.approx(first.result["train_wall_s"], abs=0.1)
    assert study.train_seconds([second]) == [second.result["train_wall_s"]]


def test_a_refused_resume_fails_before_loading_and_logs_nothing(finished, capsys):
    """The check runs before the base model loads (a missing model would be the error otherwise) and before
    the tracker starts (no empty W&B run)."""
    assets, out = finished
    runs = sorted(out.glob("wandb/*run-*"))
    code, _, err = run_cli(train_args(assets["config"], out, STEPS, "train.resume_from=latest", "optim.lr=0.02",
                                      f"model.pretrained={assets['root'] / 'missing-model'}", "tracker.backend=wandb",
                                      "tracker.mode=offline"), capsys)
    assert_one_line_error(code, err, "optim.lr: 0.01 -> 0.02")
    assert sorted(out.glob("wandb/*run-*")) == runs


@pytest.mark.parametrize("kind", ["file", "dangling link", "below a file"])
def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_any_work(finished, tmp_path, capsys, kind):
    assets, _ = finished
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("not a folder")
    elif kind == "dangling link":
        target.symlink_to(tmp_path / "gone")
    else:
        target.write_text("a file")
        target = target / "run"
    code, _, err = run_cli(train_args(assets["config"], target, STEPS, f"model.pretrained={tmp_path / 'missing-model'}"), capsys)
    assert_one_line_error(code, err, f"output_dir '{target}'")
    assert not (tmp_path / "gone").exists()


def test_overwrite_retires_the_old_runs_w_and_b_folders(finished, tmp_path, capsys):
    """A fresh start over an earlier run moves its W&B runs out of `wandb sync <dir>/wandb/offline-run-*`."""
    from deradiff import cli

    assets, _ = finished
    out = tmp_path / "run"
    assert cli.main(train_args(assets["config"], out, STEPS)) == 0
    stale = out / "wandb" / "offline-run-20260101_000000-old"
    stale.mkdir(parents=True)
    assert cli.main(train_args(assets["config"], out, STEPS, "train.overwrite=true")) == 0
    assert not stale.exists() and (out / "wandb" / "replaced" / stale.name).is_dir()


def test_study_checks_every_stage_before_the_first_one_runs(finished, tmp_path, monkeypatch):
    """Was: an output folder that is a file, or a changed override, failed only after minutes of preference
    generation. Now the study refuses before any stage (prefs_stage would fail the test if it ran)."""
    assets, _ = finished
    study.train_stage(_study(assets, tmp_path / "a"), 5000.0, [])
    monkeypatch.setattr(study, "prefs_stage", lambda cfg: pytest.fail("a stage ran before the checks"))
    with pytest.raises(DeradiffError, match=r"optim.lr: 0.01 -> 0.02"):
        study.run_study(_study(assets, tmp_path / "a", "optim.lr=0.02"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train").write_text("a file where the train folders go")
    with pytest.raises(DeradiffError, match="is inside .*train', which is a file"):
        study.run_study(_study(assets, tmp_path / "b"))
    (tmp_path / "c").write_text("a file")
    with pytest.raises(DeradiffError, match="is a file"):
        study.run_study(_study(assets, tmp_path / "c"))


def test_resume_on_a_replaced_data_file_is_refused(tmp_path, capsys):
    """Same config, same `data.source` path, other pairs in the file: the data fingerprint differs."""
    from deradiff import cli
    from deradiff.testing import write_pairs

    assets = tiny_assets(tmp_path)
    out = tmp_path / "run"
    assert cli.main(train_args(assets["config"], out, STEPS)) == 0
    write_pairs(assets["data"], 8, seed=1)
    code, _, err = run_cli(train_args(assets["config"], out, STEPS, "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, "data_fingerprint: ")


def test_a_run_refused_by_the_lock_creates_no_w_and_b_run(finished, tmp_path, capsys):
    """Another live run (here: this process's own lock) holds the output folder: refused, and nothing logged."""
    import os

    from deradiff.lock import OutputDirLock

    assets, _ = finished
    out = tmp_path / "run"
    with OutputDirLock(out):
        code, _, err = run_cli(train_args(assets["config"], out, STEPS, "tracker.backend=wandb", "tracker.mode=offline"), capsys)
    assert_one_line_error(code, err, "in use by another run", f"pid {os.getpid()}")
    assert not (out / "wandb").exists()


@pytest.mark.parametrize("damaged, named", [
    ("checkpoints/step-00000004/trainer_state.json", "checkpoint state"),
    ("history.jsonl", "training history"),
])
def test_a_damaged_record_of_a_run_is_one_clear_error(finished, tmp_path, capsys, damaged, named):
    """Files deradiff writes atomically, damaged from outside: named, never a JSON traceback (exit 1)."""
    import shutil

    assets, out = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / damaged).write_text("{not json")
    code, _, err = run_cli(train_args(assets["config"], copy, STEPS, "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, named, damaged.split("/")[-1])


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[]", "is damaged"),
    ('{"key": "k", "result": {}}', "is damaged"),
    ('{"key": "k", "seconds": "abc", "result": {}}', "is damaged"),
])
def test_a_damaged_stage_marker_is_one_clear_error(finished, tmp_path, content, message):
    """Was: JSON that is valid but not a marker exited 1 (AttributeError, KeyError, TypeError)."""
    assets, _ = finished
    cfg = _study(assets, tmp_path)
    record = study.train_stage(cfg, 5000.0, [])
    (tmp_path / "stages" / f"{record.name}.json").write_text(content)
    with pytest.raises(DeradiffError, match=f"stage marker .*{message}.*delete it"):
        study.train_stage(cfg, 5000.0, [])


def test_lora_target_modules_matching_no_layer_is_a_user_error(finished, tmp_path, capsys):
    assets, _ = finished
    code, _, err = run_cli(train_args(assets["config"], tmp_path / "run", STEPS, "lora.target_modules=[no_such_layer]"), capsys)
    assert_one_line_error(code, err, "lora.target_modules", "no_such_layer")


@pytest.mark.parametrize("damage, named", [
    ("truncate model.safetensors", "could not be loaded"),
    ("truncate random_states_0.pkl", "damaged random_states_0.pkl"),
    ("delete random_states_0.pkl", "lacks random_states_0.pkl"),
])
def test_a_damaged_checkpoint_file_is_refused_not_resumed_differently(finished, tmp_path, capsys, damage, named):
    """Was: a truncated model file exited 1 (SafetensorError); a damaged or missing RNG state resumed silently
    on another random stream (accelerate only logs it), so the adapter differed from the uninterrupted run."""
    import shutil

    assets, out = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    action, name = damage.split()
    target = copy / "checkpoints" / "step-00000004" / name
    target.write_bytes(target.read_bytes()[:10]) if action == "truncate" else target.unlink()
    code, _, err = run_cli(train_args(assets["config"], copy, STEPS, "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, named, "step-00000004")


def test_a_resume_with_no_step_left_keeps_the_final_metrics(finished, capsys):
    assets, out = finished
    before = json.loads((out / "summary.json").read_text())
    code, _, err = run_cli(train_args(assets["config"], out, STEPS, "train.resume_from=latest"), capsys)
    assert code == 0, err
    after = json.loads((out / "summary.json").read_text())
    finals = {k: v for k, v in before.items() if k.startswith("final_")}
    assert finals and {k: after[k] for k in finals} == finals


def test_a_folder_made_only_for_the_lock_is_removed_when_the_run_leaves_it_empty(tmp_path):
    """Was: a run stopped on bad input (a damaged cache, a missing model) left an empty output folder."""
    from deradiff.lock import OutputDirLock

    with pytest.raises(RuntimeError):
        with OutputDirLock(tmp_path / "new"):
            raise RuntimeError("bad input found after the lock")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with OutputDirLock(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir()  # the user's own (empty) folder stays
    with OutputDirLock(tmp_path / "used"):
        (tmp_path / "used" / "result.txt").write_text("done")
    assert (tmp_path / "used" / "result.txt").is_file()


class _NotPlainData:
    """Stands in for whatever a hostile checkpoint would pickle."""


def test_a_custom_state_that_is_not_plain_data_is_never_unpickled(finished, tmp_path, capsys):
    """accelerate loads registered custom states (DDPO's statistics) with weights_only=False."""
    import shutil

    import torch

    assets, out = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    torch.save({"stats": _NotPlainData()}, copy / "checkpoints" / "step-00000004" / "custom_checkpoint_0.pkl")
    code, _, err = run_cli(train_args(assets["config"], copy, STEPS, "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, "custom_checkpoint_0.pkl holds more than plain data")


def test_without_periodic_checkpoints_the_final_one_still_guards_a_resume(tmp_path, capsys):
    """Was: checkpoint_every=0 wrote no checkpoint, so resume_from=latest silently retrained over the run."""
    from deradiff import cli

    assets = tiny_assets(tmp_path)
    out = tmp_path / "run"
    assert cli.main(train_args(assets["config"], out, STEPS, "train.checkpoint_every=0")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]
    code, _, err = run_cli(train_args(assets["config"], out, STEPS, "train.checkpoint_every=0", "train.resume_from=latest",
                                      "optim.lr=0.02"), capsys)
    assert_one_line_error(code, err, "optim.lr: 0.01 -> 0.02")


def test_a_checkpoint_state_without_a_step_is_damaged(finished, tmp_path, capsys):
    import shutil

    assets, out = finished
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "checkpoints" / "step-00000004" / "trainer_state.json").write_text("{}")
    code, _, err = run_cli(train_args(assets["config"], copy, STEPS, "train.resume_from=latest"), capsys)
    assert_one_line_error(code, err, "is damaged (no integer step)")
