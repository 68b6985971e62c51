"""DDPO on the embedded tiny world: the reward rises, and a larger beta keeps the LoRA closer to the base.

Two real (short) trainings that differ only in beta; both LoRAs are then measured on the same prompts and
the same sampler noise against the base model (reward) and the adapter-off reference (path KL).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deradiff.config import load_config
from deradiff.models.lora import adapter_disabled
from deradiff.rewards import get_reward
from deradiff.sampling.conditions import encode
from deradiff.sampling.ddim import ddim_scheduler
from deradiff.sampling.latents import decode
from deradiff.sampling.rollout import sample_with_logprob
from deradiff.training.config import DDPOConfig
from deradiff.training.ddpo import run_ddpo
from deradiff.training.tracking import RecordingTracker

pytestmark = pytest.mark.slow  # ~45 s on 2 cores (two trainings): CI runs it with the slow tests
SMALL_BETA, LARGE_BETA = 0.001, 0.02
STEPS = 4  # DDIM steps, both in training and in the measurement


def _world_model() -> str:
    from deradiff.world import TINY_MODEL_DIR

    for candidate in (os.environ.get("DERADIFF_TINY_MODEL"), TINY_MODEL_DIR):
        if candidate and (Path(candidate) / "model_index.json").is_file():
            return str(candidate)
    pytest.skip("the tiny world model is not built (deradiff tiny pretrain)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[float, tuple[Path, RecordingTracker]]:
    """LoRAs trained for 8 rounds of 16 trajectories (4 prompts x 4), at a small and a large beta."""
    base = _world_model()
    out = {}
    for beta in (SMALL_BETA, LARGE_BETA):
        folder = tmp_path_factory.mktemp(f"ddpo-beta{beta}")
        cfg = load_config(DDPOConfig, None, [
            f"output_dir={folder}", f"model.pretrained={base}", "ddpo.reward=vividness", f"ddpo.beta={beta}",
            f"sample.num_steps={STEPS}", "sample.guidance_scale=1.0", "sample.batch_size=16",
            "sample.batches_per_round=1", "sample.images_per_prompt=4", "train.micro_batch_size=8",
            "train.max_steps=16", "optim.lr=0.01", "optim.lr_scheduler=constant", "ddpo.clip_range=0.01",
            "ddpo.stat_min_count=4", "lora.rank=8", "tracker.backend=none",
        ])
        tracker = RecordingTracker()
        run_ddpo(cfg, tracker=tracker)
        out[beta] = (folder / "lora", tracker)
    return out


def _measure(lora_dir: Path, n: int = 64, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-image (base reward, LoRA reward) and the LoRA's mean path KL to the base, with shared sampler noise."""
    from deradiff.models.pipelines import load_lora, load_pipeline
    from deradiff.world import load_prompts

    pipe = load_pipeline(_world_model())
    load_lora(pipe, lora_dir)
    prompts = load_prompts("train")
    prompts = [prompts[(7 * i) % len(prompts)] for i in range(n)]
    size = pipe.unet.config.sample_size
    cond = encode(pipe, prompts, 1.0, (size * pipe.vae_scale_factor,) * 2, "cpu")
    kw = dict(num_steps=STEPS, eta=1.0, guidance_scale=1.0, latent_shape=(4, size, size))
    scheduler, reward = ddim_scheduler(pipe.scheduler.config, STEPS), get_reward("vividness")
    lora = sample_with_logprob(pipe.unet, scheduler, cond, generator=torch.Generator().manual_seed(seed),
                               reference=lambda: adapter_disabled(pipe.unet), **kw)
    with adapter_disabled(pipe.unet):
        base = sample_with_logprob(pipe.unet, scheduler, cond, generator=torch.Generator().manual_seed(seed), **kw)
    r_base, r_lora = (reward(decode(pipe.vae, t.final), prompts) for t in (base, lora))
    return r_base, r_lora, float(lora.kl.sum(dim=1).mean())


def test_reward_rises(runs) -> None:
    lora_dir, tracker = runs[SMALL_BETA]
    rounds = tracker.series("reward_mean")[::2]  # logged every step; 2 steps per round
    assert sum(rounds[-3:]) / 3 > sum(rounds[:3]) / 3
    r_base, r_lora, _ = _measure(lora_dir)
    gain = r_lora - r_base  # paired: same prompt, same noise
    print(f"reward base {r_base.mean():.4f} -> LoRA {r_lora.mean():.4f} (paired gain {gain.mean():.4f} "
          f"+- {gain.std() / len(gain) ** 0.5:.4f}); rounds {[round(r, 3) for r in rounds]}")
    assert gain.mean() > 2 * gain.std() / len(gain) ** 0.5 > 0, gain


def test_larger_beta_stays_closer_to_reference(runs) -> None:
    kl_small, kl_large = (_measure(runs[b][0])[2] for b in (SMALL_BETA, LARGE_BETA))
    print(f"path KL to the reference: beta {SMALL_BETA} -> {kl_small:.1f} nats, beta {LARGE_BETA} -> {kl_large:.1f} nats")
    assert kl_small > 1.5 * kl_large > 0, (kl_small, kl_large)
    # the trainer's own sampling-time KL tells the same story over the last rounds
    tail = {b: sum(runs[b][1].series("kl")[-4:]) for b in (SMALL_BETA, LARGE_BETA)}
    assert tail[SMALL_BETA] > tail[LARGE_BETA]
