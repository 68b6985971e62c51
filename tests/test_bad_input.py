"""Bad input through the real CLI entry: one `error:` line naming the bad value and what is expected, exit 2,
and no partial output. Plus the inputs that must NOT stop a run: some corrupt images (skipped, counted,
warned) and W&B failing to start online (offline fallback, nothing lost).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from deradiff.testing import synthetic_pairs, write_pairs
from test_reliability_helpers import files_under, run_cli, tiny_assets, train_args, write_lora

REPO = Path(__file__).resolve().parents[1]


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one `error:` line, the last thing printed, containing every needle."""
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny base model, clean + broken preference data, two LoRAs (SD, SDXL), prompt files."""
    import peft

    from deradiff.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    w = tiny_assets(tmp_path_factory.mktemp("bad-input"))
    root = w["root"]
    rows = synthetic_pairs(4)
    del rows["label_1"]
    pq.write_table(pa.table(rows), str(root / "no-label1.parquet"))
    w["no_column"] = root / "no-label1.parquet"
    w["ties"] = Path(write_pairs(root / "ties.parquet", 4, ties=4))
    w["corrupt_all"] = Path(write_pairs(root / "corrupt-all.parquet", 4, corrupt=4))
    w["corrupt_some"] = Path(write_pairs(root / "corrupt-some.parquet", 8, corrupt=2))
    for name, build in (("lora", tiny_sd_pipeline), ("sdxl_lora", tiny_sdxl_pipeline)):
        pipe = build()
        pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                              init_lora_weights=False))
        w[name] = write_lora(root / name, pipe, {"base_model": str(w["base"]), "method": "dpo", "beta": 0.1})
    w["lora_no_meta"] = write_lora(root / "lora-no-meta", pipe_with_lora(), None)
    (root / "empty-prompts.txt").write_text("\n  \n# only a comment\n")
    w["empty_prompts"] = root / "empty-prompts.txt"
    return w


def pipe_with_lora():
    import peft

    from deradiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    return pipe


def realign_args(w, out: Path, *overrides: str) -> list[str]:
    return ["realign", f"output_dir={out}", f"base_model={w['base']}", f"lora_dir={w['lora']}", "prompts=[a red circle]",
            "lambdas=[0, 1]", "seeds=[0]", "steps=2", "device=cpu", *overrides]


# (case id, build(world, tmp_path) -> (CLI overrides, substrings the error line must contain))
TRAIN_CASES = [
    ("unknown-config-key", lambda w, t: (["train.max_stepz=3"], ["'train.max_stepz'", "known keys"])),
    ("wrong-type", lambda w, t: (["train.max_steps=abc"], ["'train.max_steps'", "expects int", "'abc'"])),
    ("out-of-range", lambda w, t: (["train.max_steps=0"], ["'train.max_steps'", ">= 1", "got 0"])),
    ("negative-beta", lambda w, t: (["dpo.beta=-1"], ["'dpo.beta'", "> 0", "-1"])),
    ("base-missing", lambda w, t: ([f"model.pretrained={t / 'no-model'}"], [str(t / "no-model"), "does not exist"])),
    ("base-not-diffusers", lambda w, t: ([f"model.pretrained={w['root']}"], [str(w["root"]), "model_index.json"])),
    ("data-missing", lambda w, t: ([f"data.source={t / 'none.parquet'}"], [str(t / "none.parquet"), "parquet"])),
    ("data-missing-column", lambda w, t: ([f"data.source={w['no_column']}"],
                                          [str(w["no_column"]), "label_1", "expected the Pick-a-Pic schema"])),
    ("data-all-ties", lambda w, t: ([f"data.source={w['ties']}"], [str(w["ties"]), "no usable", "4 ties dropped"])),
    ("data-zero-usable", lambda w, t: ([f"data.source={w['corrupt_all']}"],
                                       [str(w["corrupt_all"]), "no usable", "4 undecodable"])),
    ("unknown-reward", lambda w, t: (["data.generate.reward=pickscore_v9"], ["'data.generate.reward'", "'pickscore_v9'", "known rewards"])),
    ("bad-reward-option", lambda w, t: (["data.generate_if_missing=true", f"data.source={t / 'gen.parquet'}",
                                         "data.generate.reward_options={temperature: 2}"],
                                        ["'vividness'", "does not take options", "temperature"])),
    ("resume-not-a-checkpoint", lambda w, t: ([f"train.resume_from={t}"], [str(t), "not a checkpoint"])),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(world, tmp_path, capsys, case):
    overrides, needles = case[1](world, tmp_path)
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(world["config"], out, *overrides), capsys)
    assert_one_line_error(code, err, *needles)
    assert files_under(out) == []


def test_missing_config_file(world, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = run_cli(["train", "dpo", "--config", str(missing), f"output_dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, str(missing), "expected a YAML file")
    assert files_under(tmp_path / "run") == []


REALIGN_CASES = [
    ("lambda-negative", lambda w, t: (["lambdas=[0.5, -1]"], ["lambdas[1]", ">= 0", "-1"])),
    ("lambda-nan", lambda w, t: (["lambdas=[0.5, .nan]"], ["lambdas[1]", "finite", "nan"])),
    ("lambda-inf", lambda w, t: (["lambdas=[inf]"], ["lambdas[0]", "finite", "inf"])),
    ("lambda-empty", lambda w, t: (["lambdas=[]"], ["'lambdas'", "at least one"])),
    ("steps-zero", lambda w, t: (["steps=0"], ["'steps'", ">= 1", "got 0"])),
    ("base-missing", lambda w, t: ([f"base_model={t / 'nobase'}"], [str(t / "nobase"), "does not exist"])),
    ("lora-missing", lambda w, t: ([f"lora_dir={t / 'nolora'}"],
                                   [str(t / "nolora"), "does not exist", "pytorch_lora_weights.safetensors"])),
    ("lora-other-architecture", lambda w, t: ([f"lora_dir={w['sdxl_lora']}"],
                                              [str(w["sdxl_lora"]), "different architecture"])),
    ("prompts-file-missing", lambda w, t: (["prompts=[]", f"prompts_file={t / 'p.txt'}"],
                                           [str(t / "p.txt"), "does not exist"])),
    ("prompts-file-empty", lambda w, t: (["prompts=[]", f"prompts_file={w['empty_prompts']}"],
                                         [str(w["empty_prompts"]), "no prompts"])),
    ("bad-device", lambda w, t: (["device=warp9"], ["'warp9'", "torch device"])),
]


@pytest.mark.parametrize("case", REALIGN_CASES, ids=[c[0] for c in REALIGN_CASES])
def test_realign_bad_input(world, tmp_path, capsys, case):
    overrides, needles = case[1](world, tmp_path)
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, *overrides), capsys)
    assert_one_line_error(code, err, *needles)
    assert files_under(out) == [] and not out.exists()


def test_lambda_schedule_of_wrong_length_is_refused(world):
    """Schedules are an API feature (the CLI takes constants): one clear DeradiffError, nothing sampled."""
    import deradiff
    from deradiff.errors import DeradiffError
    from deradiff.models.pipelines import load_lora, load_pipeline

    pipe = load_pipeline(world["base"])
    load_lora(pipe, world["lora"])
    deradiff.realign(pipe, lam=[0.5, 0.5, 0.5])
    with pytest.raises(DeradiffError, match="3 values but the sampler runs 2 steps"):
        pipe("a red circle", num_inference_steps=2, output_type="pt")
    with pytest.raises(DeradiffError, match="empty list"):
        deradiff.realign(pipe, lam=[])


def test_realign_never_overwrites_results(world, tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "keep.png").write_bytes(b"earlier result")
    code, _, err = run_cli(realign_args(world, out), capsys)
    assert_one_line_error(code, err, str(out), "not empty", "overwrite=true")
    assert files_under(out) == ["keep.png"] and (out / "keep.png").read_bytes() == b"earlier result"


def test_disk_full_while_writing_images(world, tmp_path, capsys, monkeypatch):
    """ENOSPC halfway through a PNG: one error line naming the file, and no truncated file left anywhere."""
    from PIL import Image

    def half_write_then_enospc(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", half_write_then_enospc)
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out), capsys)
    line = assert_one_line_error(code, err, "No space left on device", str(out / "images" / "p000_lam0_seed0.png"))
    assert "free some space" in line
    assert files_under(out) == []


def _eval_config(tmp_path: Path, world, anchor: Path) -> Path:
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "eval"), "anchor_lora": str(anchor), "base_model": str(world["base"]),
        "prompts": ["a red circle"], "seeds": [0, 1], "rewards": ["vividness"], "kid_features": "none",
        "sampling": {"steps": 2, "batch_size": 2}, "tracker": {"backend": "none"}, "device": "cpu",
    }))
    return config


def test_eval_lora_without_metadata_when_beta_is_needed(world, tmp_path, capsys):
    code, _, err = run_cli(["eval", "--config", str(_eval_config(tmp_path, world, world["lora_no_meta"]))], capsys)
    assert_one_line_error(code, err, str(world["lora_no_meta"]), "beta")
    assert files_under(tmp_path / "eval") == []


@pytest.mark.parametrize("override, needles", [
    ("lambdas=[0.5, .nan]", ["lambdas[1]", "finite", "nan"]),
    ("extra_lambdas=[.inf]", ["extra_lambdas[0]", "finite", "inf"]),
    ("rewards=[vividness, nope]", ["'rewards'", "'nope'", "known rewards:"]),
    ("reward_options={nope: {}}", ["'reward_options'", "'nope'"]),
    ("reward_options={vividness: {model_path: /m}}", ["'vividness'", "does not take options", "model_path"]),
    ("reward_options={fidelity: {}}", ["'reward_options'", "['fidelity']", "'rewards' does not list"]),
])
def test_eval_bad_lambdas_and_rewards_fail_before_sampling(world, tmp_path, capsys, override, needles):
    config = _eval_config(tmp_path, world, world["lora"])
    code, _, err = run_cli(["eval", "--config", str(config), override], capsys)
    assert_one_line_error(code, err, *needles)
    assert files_under(tmp_path / "eval") == []


def test_eval_never_overwrites_results(world, tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text('{"earlier": true}')
    code, _, err = run_cli(["eval", "--config", str(_eval_config(tmp_path, world, world["lora"]))], capsys)
    assert_one_line_error(code, err, str(tmp_path / "eval"), "overwrite=true")
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == {"earlier": True}


def test_reward_weights_missing_locally(world, tmp_path, capsys, monkeypatch):
    """The model-backed reward here is the tiny world's `fidelity` classifier (PickScore/aesthetic wrappers do
    not exist yet): its weights missing must be one line naming the folder, before any model is sampled."""
    import deradiff.world.classifier as classifier

    missing = tmp_path / "no-classifier"
    monkeypatch.setattr(classifier, "ASSETS_DIR", missing)
    out = tmp_path / "prefs"
    code, _, err = run_cli(["data", "prefs", "--config", str(REPO / "configs/tiny/prefs.yaml"), f"output_dir={out}",
                            f"base_model={world['base']}", "generate.reward=fidelity"], capsys)
    assert_one_line_error(code, err, str(missing))
    assert files_under(out) == []


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path, capsys, monkeypatch):
    import torch

    import deradiff.training.dpo_step as dpo_step
    from deradiff.training.checkpoint import resolve_resume

    real_loss = dpo_step.diffusion_dpo_loss
    calls = []

    def nan_from_the_7th_micro_batch(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 7:  # accumulation 2: micro-batch 6 belongs to step 3
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(dpo_step, "diffusion_dpo_loss", nan_from_the_7th_micro_batch)
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(world["config"], out), capsys)
    assert_one_line_error(code, err, "loss became nan", "at step 3 ")
    assert resolve_resume(out, "latest").name == "step-00000003"  # steps 0..2 done: the last good checkpoint
    assert not (out / "lora").exists() and not (out / "summary.json").exists()  # no adapter from a NaN run


def test_some_corrupt_images_are_skipped_counted_and_warned(world, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped 2 preference pairs with undecodable images"):
        code, stdout, err = run_cli(train_args(world["config"], out, f"data.source={world['corrupt_some']}",
                                               "train.max_steps=1"), capsys)
    assert code == 0, err
    assert "2 undecodable images skipped, 6 pairs kept" in stdout
    assert json.loads((out / "lora" / "deradiff_metadata.json").read_text())["data_pairs"] == 6


def test_wandb_unreachable_falls_back_offline_and_loses_nothing(world, tmp_path, capsys, monkeypatch):
    import wandb

    real_init = wandb.init

    def not_logged_in(mode=None, **kwargs):
        if mode == "online":
            raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
        return real_init(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", not_logged_in)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="logging offline instead"):
        code, _, err = run_cli(train_args(world["config"], out, "tracker.backend=wandb", "tracker.mode=online",
                                          "train.max_steps=2"), capsys)
    assert code == 0, err
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "summary.json").is_file()
    runs = list(out.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
