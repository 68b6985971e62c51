"""Config reliability (issue #12): paths in a YAML resolve from that YAML, values keep the text the user wrote,
seeds and other ranges are checked at load with the key named, devices the machine lacks are refused at load,
every user error exits 2, and launch/cpu_2proc.sh finds the project's environment itself.

All of these fail before any model loads, so the whole file runs in seconds.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deradiff import study
from deradiff.config import SEED_MAX, load_config, save_config
from deradiff.errors import ConfigError
from deradiff.eval.config import EvalConfig
from deradiff.training.config import DDPOConfig
from test_bad_input import assert_one_line_error
from test_reliability_helpers import files_under, run_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# ---- 1. paths written in a YAML resolve from that YAML's folder ---------------------------------------------
@pytest.mark.parametrize("name", ["tiny/study.yaml", "tiny/study_dpo.yaml", "tiny/study_full.yaml", "sd15/study.yaml",
                                  "sdxl/study.yaml"])
def test_study_yaml_loads_from_another_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(study.StudyConfig, CONFIGS / name)
    folder = (CONFIGS / name).parent
    assert Path(cfg.train_config).resolve() == (folder / yaml.safe_load((CONFIGS / name).read_text())["train_config"]).resolve()
    assert Path(cfg.train_config).resolve().parent.parent == CONFIGS and Path(cfg.eval_config).is_file()
    assert cfg.output_dir == yaml.safe_load((CONFIGS / name).read_text())["output_dir"]  # outputs: current directory


def test_tiny_study_stage_configs_load_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(study.StudyConfig, CONFIGS / "tiny/study.yaml", [f"output_dir={tmp_path / 'study'}"])
    assert Path(cfg.train_config) == CONFIGS / "tiny/reward_grad.yaml"
    assert Path(cfg.eval_config) == CONFIGS / "tiny/eval.yaml"
    tcfg = study.train_config(cfg, cfg.betas[0])
    assert tcfg.reward_grad.beta == cfg.betas[0] and tcfg.train.max_steps == 32
    assert study.eval_config(cfg, "anchor", ["retrained"]).anchor_lora == "anchor"


def test_override_paths_stay_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(CONFIGS / "tiny/dpo.yaml", tmp_path / "mine.yaml")
    cfg = load_config(study.StudyConfig, CONFIGS / "tiny/study_dpo.yaml", ["train_config=mine.yaml"])
    assert cfg.train_config == "mine.yaml"
    with pytest.raises(ConfigError, match=r"config key 'train_config' names 'nope.yaml', which does not exist"):
        load_config(study.StudyConfig, CONFIGS / "tiny/study_dpo.yaml", ["train_config=nope.yaml"])


def test_missing_path_in_a_yaml_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "study.yaml").write_text(
        f"output_dir: out\nbeta0: 1.0\nbetas: [2.0]\ntrain_config: {CONFIGS / 'tiny/dpo.yaml'}\neval_config: eval.yaml\n")
    code, _, err = run_cli(["study", "--config", "conf/study.yaml"], capsys)
    assert_one_line_error(code, err, "'eval_config'", f"'{tmp_path / 'conf' / 'eval.yaml'}'", "does not exist", "YAML's folder")
    assert files_under(tmp_path / "out") == []


def test_missing_default_config_says_it_is_the_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["study"], capsys)
    assert_one_line_error(code, err, "--config 'configs/tiny/study.yaml'", "the default", "does not exist")


def _write_ddpo_yaml(folder: Path, **sections: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ddpo.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "runs/ddpo", **sections, "train": {"max_steps": 8, **sections.get("train", {})}}))
    return path


def test_trainer_input_files_resolve_from_the_yaml_and_names_stay_names(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    path = _write_ddpo_yaml(conf, ddpo={"prompts": "prompts.txt"}, train={"deepspeed_config": "ds.json"},
                            model={"pretrained": "runwayml/stable-diffusion-v1-5"})
    (conf / "prompts.txt").write_text("a red square\n")
    (conf / "ds.json").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(DDPOConfig, path)
    assert Path(cfg.ddpo.prompts) == conf / "prompts.txt" and Path(cfg.train.deepspeed_config) == conf / "ds.json"
    assert cfg.model.pretrained == "runwayml/stable-diffusion-v1-5"  # hub ids and local models: not rewritten
    assert cfg.output_dir == "runs/ddpo"  # outputs land where the user runs
    world = load_config(DDPOConfig, _write_ddpo_yaml(tmp_path / "w", ddpo={"prompts": "world:eval"}))
    assert world.ddpo.prompts == "world:eval" and world.model.pretrained == "tiny"


@pytest.mark.parametrize("section, key", [({"ddpo": {"prompts": "missing.txt"}}, "ddpo.prompts"),
                                          ({"ddpo": {"prompts": "world:test"}}, "ddpo.prompts"),
                                          ({"train": {"deepspeed_config": "missing.json"}}, "train.deepspeed_config")])
def test_missing_trainer_input_file_names_the_key(tmp_path, section, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        load_config(DDPOConfig, _write_ddpo_yaml(tmp_path, **section))


def test_saved_config_reloads_the_same_files_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(study.StudyConfig, None, ["output_dir=o", "beta0=1", "betas=[2]",
                                                 "train_config=configs/tiny/dpo.yaml"])
    save_config(cfg, tmp_path / "saved.yaml")
    monkeypatch.chdir(tmp_path)
    again = load_config(study.StudyConfig, tmp_path / "saved.yaml")
    assert Path(again.train_config) == CONFIGS / "tiny/dpo.yaml" and again.output_dir == "o"


# ---- 2. values keep the text the user wrote ----------------------------------------------------------------
EVAL = ["output_dir=o", "anchor_lora=a"]
DDPO = ["output_dir=o", "train.max_steps=8", "train.checkpoint_every=0"]  # the defaults' 100 steps split no round


@pytest.mark.parametrize("text", ["2026-12-03", "0755", "1:30", "yes", "off", "1.10", "a: b", "1e3", "[x"])
def test_string_override_takes_the_text_as_written(text):
    cfg = load_config(EvalConfig, None, [*EVAL, f"group={text}", f"tracker.run_name={text}", f"tracker.project={text}"])
    assert cfg.group == cfg.tracker.run_name == cfg.tracker.project == text


def test_string_values_in_a_yaml_keep_their_text(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("output_dir: o\nanchor_lora: a\ngroup: 2026-12-03\n"
                    "tracker: {run_name: 1:30, project: 0755, tags: [on, 2026-12-03, 1.10]}\n")
    cfg = load_config(EvalConfig, path)
    assert (cfg.group, cfg.tracker.run_name, cfg.tracker.project) == ("2026-12-03", "1:30", "0755")
    assert cfg.tracker.tags == ["on", "2026-12-03", "1.10"]


def test_null_for_a_string():
    assert load_config(EvalConfig, None, [*EVAL, "group=null"]).group is None  # nullable: null
    assert load_config(EvalConfig, None, [*EVAL, "group='null'"]).group == "null"  # quoted: the word
    with pytest.raises(ConfigError, match=r"config key 'tracker.project' expects a string, got null"):
        load_config(EvalConfig, None, [*EVAL, "tracker.project=null"])


@pytest.mark.parametrize("override, message", [
    ("seeds=[0755]", r"'seeds\[0\]' expects int, got '0755' \(a leading zero"),
    ("num_prompts=1:30", r"'num_prompts' expects int, got '1:30'"),
    ("num_prompts=2026-12-03", r"'num_prompts' expects int, got '2026-12-03'"),
    ("num_prompts=1e3", r"'num_prompts' expects int, got 1000.0"),
    ("num_prompts=yes", r"'num_prompts' expects int, got True"),
    ("bootstrap.confidence=1:30", r"'bootstrap.confidence' expects float, got '1:30'"),
    ("bootstrap.confidence=.nan", r"'bootstrap.confidence' must be a finite number, got nan"),
    ("extra_lambdas=[inf]", r"'extra_lambdas\[0\]' must be a finite number, got inf"),
    ("weight_scaled=maybe", r"'weight_scaled' expects true or false \(yes/no and on/off also work\), got 'maybe'"),
    ("weight_scaled=1", r"'weight_scaled' expects true or false"),
    ("kid_features=yes", r"'kid_features' must be one of \['classifier', 'pixels', 'none'\], got 'yes'"),
])
def test_non_string_fields_refuse_what_is_not_their_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EvalConfig, None, [*EVAL, override])


def test_numbers_booleans_and_choices_that_are_meant():
    cfg = load_config(EvalConfig, None, [*EVAL, "num_prompts=1_000", "bootstrap.confidence=9e-1", "weight_scaled=no",
                                         "save_samples=ON", "seeds=[7, 1_000]"])
    assert (cfg.num_prompts, cfg.bootstrap.confidence, cfg.weight_scaled, cfg.save_samples) == (1000, 0.9, False, True)
    assert cfg.seeds == [7, 1000]
    ddpo = load_config(DDPOConfig, None, [*DDPO, "train.mixed_precision=no", "ddpo.prompts=[no, 1:30]"])
    assert ddpo.train.mixed_precision == "no" and ddpo.ddpo.prompts == ["no", "1:30"]


# ---- 3. seeds and other ranges: checked at load, key named -------------------------------------------------
RANGE_CASES = [
    # (schema, overrides, the key the error must name)
    ("ddpo", ["train.seed=-1"], "train.seed"),
    ("ddpo", [f"train.seed={SEED_MAX + 1}"], "train.seed"),
    ("eval", ["seeds=[0, -1]"], "seeds[1]"),
    ("eval", [f"seeds=[{2**64}, 1]"], "seeds[0]"),
    ("eval", [f"bootstrap.seed={SEED_MAX + 1}"], "bootstrap.seed"),
    ("eval", [f"oracle.seed_offset={SEED_MAX - 10}"], "oracle.seed_offset"),  # + 255 would pass 2**32
    ("eval", ["seeds=[1000000, 1]"], "seeds"),  # one of the oracle's base-sample seeds
    ("pretrain", [f"seed={SEED_MAX}"], "seed"),  # the classifier is evaluated with seed + 1
    ("quality", [f"seed={SEED_MAX - 1}", "num_images=3"], "seed"),
    ("prefs", ["generate.seed=-5"], "generate.seed"),
    ("ddpo", ["train.max_steps=0"], "train.max_steps"),
    ("ddpo", ["train.keep_checkpoints=-1"], "train.keep_checkpoints"),
    ("ddpo", ["lora.alpha=0"], "lora.alpha"),
    ("ddpo", ["lora.target_modules=[]"], "lora.target_modules"),
    ("ddpo", ["optim.lr=0"], "optim.lr"),
    ("ddpo", ["optim.adam_beta2=1"], "optim.adam_beta2"),
    ("ddpo", ["optim.lr=.inf"], "optim.lr"),
    ("ddpo", ["model.resolution=100"], "model.resolution"),
    ("ddpo", ["sample.guidance_scale=-1"], "sample.guidance_scale"),
    ("ddpo", ["ddpo.adv_clip_max=0"], "ddpo.adv_clip_max"),
    ("ddpo", ["ddpo.prompts=[' ']"], "ddpo.prompts"),
    ("eval", ["num_prompts=0"], "num_prompts"),
    ("eval", ["prompts=[]"], "prompts"),
    ("eval", ["sampling.batch_size=0"], "sampling.batch_size"),
    ("eval", ["sampling.height=100"], "sampling.height"),
    ("eval", ["extra_lambdas=[.nan]"], "extra_lambdas[0]"),
    ("study", ["betas=[]"], "betas"),
    ("study", ["sweep_sizes=[3, 0]"], "sweep_sizes[1]"),
    ("pretrain", ["unet.ema_decay=1"], "unet.ema_decay"),
    ("pretrain", ["vae.batch_size=0"], "vae.batch_size"),
    ("quality", ["num_images=0"], "num_images"),
    ("quality", ["split=test"], "split"),
]


def _schema(name: str) -> tuple[type, list[str]]:
    from deradiff.data.config import PrefsConfig
    from deradiff.world.config import PretrainConfig, QualityConfig

    return {"ddpo": (DDPOConfig, DDPO), "eval": (EvalConfig, EVAL), "pretrain": (PretrainConfig, []),
            "quality": (QualityConfig, []), "prefs": (PrefsConfig, []),
            "study": (study.StudyConfig, ["output_dir=o", "beta0=1", "betas=[2]", f"train_config={CONFIGS / 'tiny/dpo.yaml'}",
                                          f"eval_config={CONFIGS / 'tiny/eval.yaml'}"])}[name]


@pytest.mark.parametrize("schema, overrides, key", RANGE_CASES, ids=[" ".join(c[1]) for c in RANGE_CASES])
def test_out_of_range_values_name_the_key(schema, overrides, key):
    cls, base = _schema(schema)
    with pytest.raises(ConfigError) as info:
        load_config(cls, None, [*base, *overrides])
    assert f"config key '{key}'" in str(info.value) and "\n" not in str(info.value)


def test_seed_range_edges_are_accepted():
    assert load_config(DDPOConfig, None, [*DDPO, f"train.seed={SEED_MAX}"]).train.seed == SEED_MAX
    assert load_config(EvalConfig, None, [*EVAL, f"seeds=[0, {SEED_MAX}]"]).seeds == [0, SEED_MAX]
    cfg = load_config(EvalConfig, None, [*EVAL, f"oracle.seed_offset={SEED_MAX - 255}"])  # its last seed: SEED_MAX
    assert cfg.oracle.seed_offset == SEED_MAX - 255


def test_train_seed_out_of_range_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "dpo", "--config", str(CONFIGS / "tiny/dpo.yaml"), f"output_dir={out}",
                            "train.seed=-1"], capsys)
    assert_one_line_error(code, err, "'train.seed'", "[0, 4294967295]", "got -1")
    assert not out.exists()


# ---- 4. devices the machine does not have ------------------------------------------------------------------
@pytest.fixture
def two_gpus_or_none(monkeypatch):
    """Pretend the machine has `n` CUDA devices (and no MPS), whatever it really has."""
    import torch

    def pretend(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    return pretend


@pytest.mark.parametrize("gpus, device, needles", [
    (0, "cuda", ["'device' is 'cuda'", "CUDA is not available", "available devices: cpu)", "device=cpu"]),
    (0, "mps", ["'device' is 'mps'", "MPS is not available", "available devices: cpu)"]),
    (2, "cuda:2", ["'device' is 'cuda:2'", "2 CUDA device(s)", "cpu, cuda:0, cuda:1"]),
    (0, "warp9", ["'device'", "torch device", "'warp9'"]),
])
def test_unavailable_device_exits_2_with_the_devices_there_are(tmp_path, capsys, two_gpus_or_none, gpus, device, needles):
    two_gpus_or_none(gpus)
    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", "--config", str(CONFIGS / "tiny/eval.yaml"), f"output_dir={out}", f"device={device}"],
                           capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_available_devices_are_accepted(two_gpus_or_none):
    two_gpus_or_none(2)
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert load_config(EvalConfig, None, [*EVAL, f"device={device}"]).device == device


# ---- 5. user errors exit 2, bugs exit 1 --------------------------------------------------------------------
def test_a_refused_path_exits_2_and_an_internal_oserror_exits_1(monkeypatch, capsys):
    import deradiff.cli.common as common

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/locked.yaml")

    monkeypatch.setattr(common, "load_config", refuse)
    code, _, err = run_cli(["eval", "--config", str(CONFIGS / "tiny/eval.yaml")], capsys)
    assert_one_line_error(code, err, "'/data/locked.yaml'", "Permission denied")

    def bug(*args, **kwargs):
        raise OSError("something internal")

    monkeypatch.setattr(common, "load_config", bug)
    code, _, err = run_cli(["eval", "--config", str(CONFIGS / "tiny/eval.yaml")], capsys)
    assert code == 1 and "OSError: something internal" in err


# ---- 6. launch/cpu_2proc.sh finds the project's environment ------------------------------------------------
SCRIPT = REPO / "launch" / "cpu_2proc.sh"
BARE_PATH = "/usr/bin:/bin"  # no .venv/bin: as in a shell where the venv is not activated


def _run_script(script: Path, path: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp")},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not (REPO / ".venv/bin/accelerate").is_file(), reason="needs the project's .venv (scripts/test.sh)")
def test_cpu_2proc_uses_the_project_venv_without_activation():
    result = _run_script(SCRIPT, BARE_PATH, "--help")
    assert result.returncode == 0, result.stderr
    assert "accelerate" in result.stdout and "--num_processes" in result.stdout
    assert "not found" not in result.stderr


def test_cpu_2proc_falls_back_to_accelerate_on_path(tmp_path):
    (tmp_path / "launch").mkdir()
    script = Path(shutil.copy(SCRIPT, tmp_path / "launch" / "cpu_2proc.sh"))  # no .venv next to this copy
    fake = tmp_path / "bin" / "accelerate"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "fake accelerate $*"\n')
    fake.chmod(0o755)
    result = _run_script(script, f"{fake.parent}:{BARE_PATH}", "train/dpo.py", "--config", "c.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("fake accelerate launch --multi_gpu --num_processes 2 --num_machines 1 "
                                     "--mixed_precision no --dynamo_backend no train/dpo.py --config c.yaml")
    missing = _run_script(script, BARE_PATH, "train/dpo.py")
    assert missing.returncode == 2 and "accelerate not found" in missing.stderr and ".venv" in missing.stderr


def test_a_binary_config_file_is_one_error_line(tmp_path, capsys):
    """Was: exit 1 with a UnicodeDecodeError."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\x00\x01\xff\xfe garbage")
    code, _, err = run_cli(["data", "prefs", "--config", str(bad)], capsys)
    assert_one_line_error(code, err, f"config file '{bad}' is not a UTF-8 text file")


def test_a_yaml_relative_path_is_the_same_however_the_config_path_is_typed(monkeypatch):
    """Otherwise `--config configs/...` and `--config $PWD/configs/...` would give different settings, and a
    resume or a study stage would see a change that is not one."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    relative = load_config(study.StudyConfig, "configs/tiny/study.yaml")
    absolute = load_config(study.StudyConfig, str(repo / "configs/tiny/study.yaml"))
    assert relative.train_config == absolute.train_config == str(repo / "configs/tiny/reward_grad.yaml")
