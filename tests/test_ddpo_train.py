"""DDPO trainer: configs, CLI registration, exact resume and the KL-in-loss path on a tiny random SD model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deradiff.config import load_config
from deradiff.errors import ConfigError, DeradiffError
from deradiff.models.pipelines import read_lora_metadata
from deradiff.training.config import DDPOConfig
from deradiff.training.ddpo import load_prompt_source, run_ddpo
from deradiff.training.tracking import RecordingTracker

ROOT = Path(__file__).resolve().parents[1]


def _cfg(base: str, out: Path, *extra: str) -> DDPOConfig:
    # 2 inner epochs x 1 micro-batch = 2 optimizer steps per round; 2 of 3 DDIM steps trained per sample
    return load_config(DDPOConfig, None, [
        f"output_dir={out}", f"model.pretrained={base}", "ddpo.reward=vividness", "ddpo.prompts=[red, blue]",
        "sample.num_steps=3", "sample.guidance_scale=2.0", "sample.batch_size=2", "sample.batches_per_round=2",
        "train.micro_batch_size=4", "ddpo.inner_epochs=2", "ddpo.timestep_fraction=0.6", "ddpo.stat_min_count=2",
        "ddpo.clip_range=0.01", "optim.lr=0.01", "optim.lr_scheduler=constant", "tracker.backend=none", *extra,
    ])


def test_shipped_configs_load() -> None:
    tiny = load_config(DDPOConfig, ROOT / "configs/tiny/ddpo.yaml")
    sd15 = load_config(DDPOConfig, ROOT / "configs/sd15/ddpo.yaml")
    assert sd15.sample.num_steps == 50 and sd15.sample.eta == 1.0 and sd15.sample.guidance_scale == 5.0
    assert sd15.optim.lr == 3e-4 and sd15.ddpo.clip_range == 1e-4 and sd15.ddpo.adv_clip_max == 5.0
    assert sd15.steps_per_round == 4 and sd15.train.max_steps % sd15.steps_per_round == 0
    assert tiny.model.pretrained == "tiny" and tiny.ddpo.beta > 0


def test_config_validation_names_the_key() -> None:
    base = ["output_dir=x", "sample.batch_size=4", "sample.batches_per_round=1", "train.micro_batch_size=4"]
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(DDPOConfig, None, [*base, "ddpo.inner_epochs=2", "train.max_steps=3"])
    with pytest.raises(ConfigError, match="checkpoint_every"):
        load_config(DDPOConfig, None, [*base, "train.max_steps=4", "train.checkpoint_every=3", "ddpo.inner_epochs=2"])
    with pytest.raises(ConfigError, match="sample.eta"):
        load_config(DDPOConfig, None, [*base, "sample.eta=0"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(DDPOConfig, None, [*base, "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="'ddpo.reward' names unknown reward 'pickscore_v9'"):
        load_config(DDPOConfig, None, [*base, "ddpo.reward=pickscore_v9"])


def test_reward_options_reach_the_reward_before_any_model_loads(tmp_path: Path, monkeypatch) -> None:
    from deradiff.rewards import base as reward_base

    received: list[dict] = []

    class Stop(Exception):
        pass

    def factory(model_path: str, dtype: str = "float32"):
        received.append({"model_path": model_path, "dtype": dtype})
        raise Stop

    monkeypatch.setitem(reward_base._REGISTRY, "test_reward", factory)
    no_model = tmp_path / "no-model"  # never reached: the reward is built first
    cfg = _cfg(str(no_model), tmp_path / "run", "ddpo.reward=test_reward", "ddpo.reward_options={model_path: /m}")
    with pytest.raises(Stop):
        run_ddpo(cfg, tracker=RecordingTracker())
    assert received == [{"model_path": "/m", "dtype": "float32"}]
    bad = _cfg(str(no_model), tmp_path / "run", "ddpo.reward=test_reward", "ddpo.reward_options={path: /m}")
    with pytest.raises(ConfigError, match="does not take options \\['path'\\]; it accepts: model_path, dtype"):
        run_ddpo(bad, tracker=RecordingTracker())


def test_prompt_sources(tmp_path: Path) -> None:
    assert load_prompt_source(["a", " ", "b"]) == ["a", "b"]
    (tmp_path / "p.txt").write_text("cat\n\ndog\n")
    assert load_prompt_source(str(tmp_path / "p.txt")) == ["cat", "dog"]
    assert len(load_prompt_source("world:train")) > 10
    with pytest.raises(DeradiffError, match="neither"):
        load_prompt_source(str(tmp_path / "missing.txt"))


def test_cli_lists_ddpo(capsys: pytest.CaptureFixture[str]) -> None:
    from deradiff.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "ddpo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "ddpo.beta" in out and "ddpo.kl_in" in out and "sample.eta" in out


class CrashAfter(RecordingTracker):
    """Simulates a kill right after optimizer step `at` (the checkpoint before it is already written)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        super().log_scalars(values, step)
        if step == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_exactly_and_kl_loss_path(tiny_base: str, tmp_path: Path) -> None:
    common = ("ddpo.beta=0.5", "ddpo.kl_in=loss", "train.max_steps=4", "train.checkpoint_every=2")
    rec = RecordingTracker()
    summary = run_ddpo(_cfg(tiny_base, tmp_path / "full", *common), tracker=rec)
    assert summary["steps_run"] == 4
    assert rec.series("round") == [0.0, 0.0, 1.0, 1.0]
    assert rec.series("kl")[0] == 0.0 and rec.series("kl")[-1] > 0  # LoRA starts at the base model
    assert all(v > 0 for v in rec.series("kl_loss")[1:])
    assert {"reward_mean", "reward_std", "clip_fraction", "approx_kl", "objective"} <= set(rec.scalars[0][1])
    assert rec.images and rec.images[0][2].shape[1] == 3
    meta = read_lora_metadata(tmp_path / "full" / "lora")
    assert meta["method"] == "ddpo" and meta["beta"] == 0.5 and meta["reward"] == "vividness" and meta["steps"] == 4

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_ddpo(_cfg(tiny_base, out, *common), tracker=CrashAfter(at=3))
    resumed = run_ddpo(_cfg(tiny_base, out, *common, "train.resume_from=latest"), tracker=RecordingTracker())
    assert resumed["steps_run"] == 2
    a = load_file(str(tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)


def test_lora_loads_and_realigns_with_its_beta(tiny_base: str, tmp_path: Path) -> None:
    """kl_in=reward run; its LoRA is an ordinary deradiff LoRA: stock loading, realign reads beta from metadata."""
    import deradiff
    from deradiff.models.pipelines import load_lora, load_pipeline

    rec = RecordingTracker()
    run_ddpo(_cfg(tiny_base, tmp_path, "ddpo.beta=0.5", "ddpo.kl_in=reward", "train.max_steps=4"), tracker=rec)
    last = rec.scalars[-1][1]
    assert "kl_loss" not in last and last["kl"] > 0
    assert last["objective"] == pytest.approx(last["reward_mean"] - 0.5 * last["kl"], rel=1e-5)
    pipe = load_pipeline(tiny_base)
    assert load_lora(pipe, tmp_path / "lora")["beta"] == 0.5
    handle = deradiff.realign(pipe, 0.5)
    assert handle.effective_beta == pytest.approx(1.0)
    image = pipe(["red"], num_inference_steps=2, eta=1.0, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
