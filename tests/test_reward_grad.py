"""Reward-gradient trainer: differentiable rewards, the chain loss at a zero LoRA, a short run's LoRA and metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deradiff.config import load_config
from deradiff.errors import ConfigError
from deradiff.models.lora import attach_lora
from deradiff.models.pipelines import read_lora_metadata
from deradiff.rewards import get_reward
from deradiff.testing import tiny_sd_pipeline
from deradiff.training.config import RewardGradConfig
from deradiff.training.reward_grad import ChainLoss, run_reward_grad
from deradiff.training.trainer import read_history

ROOT = Path(__file__).resolve().parents[1]


def _cfg(base: str, out: Path, *extra: str) -> RewardGradConfig:
    return load_config(RewardGradConfig, None, [
        f"output_dir={out}", f"model.pretrained={base}", "reward_grad.prompts=[red, blue]", "reward_grad.beta=0.5",
        "sample.num_steps=3", "sample.guidance_scale=2.0", "train.micro_batch_size=2", "train.max_steps=3",
        "train.checkpoint_every=0", "optim.lr=0.01", "optim.lr_scheduler=constant", "tracker.backend=none", *extra,
    ])


def test_with_grad_backpropagates_and_only_for_differentiable_rewards():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    get_reward("vividness").with_grad(images, ["a", "b"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not differentiable"):
        get_reward("jpeg_compressibility").with_grad(images, ["a", "b"])


def test_config_refuses_a_non_differentiable_reward_and_loads_the_shipped_yaml():
    with pytest.raises(ConfigError, match="'reward_grad.reward': 'jpeg_compressibility' is not differentiable"):
        load_config(RewardGradConfig, None, ["output_dir=x", "reward_grad.reward=jpeg_compressibility"])
    tiny = load_config(RewardGradConfig, ROOT / "configs/tiny/reward_grad.yaml")
    assert tiny.reward_grad.beta > 0 and tiny.sample.eta > 0


def test_chain_loss_at_a_zero_lora_is_minus_the_reward_and_its_gradient_reaches_the_lora(tiny_base, tmp_path):
    cfg = _cfg(tiny_base, tmp_path)
    pipe = tiny_sd_pipeline(seed=0)
    params = attach_lora(pipe.unet, rank=2)  # peft starts B at 0: the LoRA model is the base model
    loss_fn = ChainLoss(cfg, pipe, pipe.unet, "cpu", 0, get_reward("vividness"), ["red", "blue"])
    loss, metrics = loss_fn(0)
    assert metrics["kl"] == 0.0 and loss.item() == pytest.approx(-metrics["reward_mean"], rel=1e-6)
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    again, _ = loss_fn(0)  # the micro-step alone fixes prompts and noise
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_short_run_is_deterministic_and_writes_reward_unit_metadata(tiny_base, tmp_path):
    summaries = [run_reward_grad(_cfg(tiny_base, tmp_path / name)) for name in ("a", "b")]
    assert summaries[0]["adapter_digest_per_rank"] == summaries[1]["adapter_digest_per_rank"]
    meta = read_lora_metadata(tmp_path / "a" / "lora")
    assert (meta["method"], meta["beta"], meta["beta_units"], meta["reward"]) == ("reward_grad", 0.5, "reward", "vividness")
    assert meta["sampler"] == {"num_steps": 3, "eta": 1.0, "guidance_scale": 2.0}
    assert meta["wandb_group"] == "train-a"  # later stages on this LoRA (tune) log beside its training
    # the run's config beside its LoRA loads back to the same config (tune's verify retrains from it)
    assert load_config(RewardGradConfig, tmp_path / "a" / "train_config.yaml") == _cfg(tiny_base, tmp_path / "a")
    history = read_history(tmp_path / "a", 3)
    assert [h["step"] for h in history] == [1, 2, 3] and history[0]["kl"] == 0.0 and history[-1]["kl"] > 0
    assert all(h["objective"] == pytest.approx(h["reward_mean"] - 0.5 * h["kl"], rel=1e-5, abs=1e-7) for h in history)
