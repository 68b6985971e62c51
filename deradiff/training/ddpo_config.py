"""The DDPO config: the shared trainer sections plus `sample` (the DDIM sampler) and `ddpo` (the objective).

Loop shape (per process): a *round* samples `sample.batch_size * sample.batches_per_round` trajectories
with the LoRA on, scores them, and then runs `ddpo.inner_epochs` passes of PPO updates over them in
micro-batches of `train.micro_batch_size`, each micro-batch once per trained timestep. One optimizer step
accumulates `train.gradient_accumulation_steps` micro-batches x all trained timesteps, so a round is
`steps_per_round` optimizer steps and `train.max_steps` counts optimizer steps (a multiple of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from deradiff.config import check_min, check_positive, check_prompt_source, option
from deradiff.errors import ConfigError
from deradiff.training.config import TrainerConfig

BETA_HELP = (
    "KL strength beta >= 0 of the objective E[reward] - beta * KL, where KL is the closed-form KL of the whole "
    "DDIM chain to the reference (adapter off): sum over sampled steps of ||mu_lora - mu_ref||^2 / (2 sigma_t^2), "
    "summed over latent dims, in nats per image, rewards in their own units. Realign with "
    "lambda = beta_trained / beta_target to emulate training at beta_target (0: plain DDPO)"
)


@dataclass
class ChainSection:
    """The stochastic DDIM sampler whose chains are trained on (and whose path KL beta multiplies)."""

    num_steps: int = option(50, "DDIM steps per trajectory")
    eta: float = option(1.0, "DDIM eta (> 0: each step must be a Gaussian with a log-density); 1 = DDPM-like")
    guidance_scale: float = option(5.0, "classifier-free guidance scale (1: no CFG)")
    negative_prompt: str = option("", "the unconditional prompt for CFG")

    def validate(self) -> None:
        if self.eta <= 0:
            raise ConfigError(f"config key 'sample.eta' must be > 0 (stochastic steps define the path KL), got {self.eta}")
        check_min(self, "sample.", {"num_steps": 1, "guidance_scale": 0})


@dataclass
class SampleSection(ChainSection):
    """DDPO's sampler plus how many trajectories a round samples."""

    batch_size: int = option(8, "trajectories per process per sampling forward")
    batches_per_round: int = option(4, "sampling batches per round (per process)")
    images_per_prompt: int = option(
        1, "trajectories per drawn prompt in a round (>1: per-prompt baselines from the first round; 1: published DDPO)"
    )

    def validate(self) -> None:
        super().validate()
        for key in ("batch_size", "batches_per_round", "images_per_prompt"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'sample.{key}' must be >= 1, got {getattr(self, key)}")


@dataclass
class DDPOSection:
    """The KL-regularized policy-gradient objective."""

    reward: str = option("vividness", "reward name from deradiff.rewards (e.g. vividness, jpeg_compressibility, aesthetic)")
    reward_options: dict[str, Any] = option(
        {}, "keyword arguments for the reward, e.g. {model_path: /models/aesthetic} (see docs/rewards.md)")
    prompts: str | list[str] = option(
        "world:train", "prompt source: 'world:train' / 'world:eval' (tiny world), a .txt file (one per line), or a list",
        relative_to_yaml=True,
    )
    beta: float = option(0.0, BETA_HELP)
    kl_in: Literal["reward", "loss"] = option(
        "loss",
        "where the KL enters: 'loss' (beta*KL_t added per trained step, differentiated through the LoRA mean at "
        "fixed x_t; scaled like the normalised advantages so beta means the same in both) or 'reward' "
        "(advantages of reward - beta*KL, KL sampled once per round; a noisier score-function estimate; "
        "measured: docs/configs.md)",
    )
    clip_range: float = option(1e-4, "PPO clip range on the per-dimension probability ratio")
    adv_clip_max: float = option(5.0, "clip normalised advantages to [-adv_clip_max, adv_clip_max]")
    inner_epochs: int = option(1, "PPO passes over each round's samples")
    timestep_fraction: float = option(1.0, "fraction of the DDIM steps trained per sample (random subset per sample)")
    stat_buffer_size: int = option(32, "per-prompt reward history for advantage normalisation (0: batch statistics)")
    stat_min_count: int = option(16, "rewards a prompt needs before its own statistics are used")
    log_images: int = option(4, "images logged per round (0: none)")

    def validate(self) -> None:
        from deradiff.rewards import check_reward_name

        check_reward_name(self.reward, "ddpo.reward")
        check_min(self, "ddpo.", {"beta": 0})
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"config key 'ddpo.timestep_fraction' must be in (0, 1], got {self.timestep_fraction}")
        check_min(self, "ddpo.", {"inner_epochs": 1})
        check_positive(self, "ddpo.", ["clip_range", "adv_clip_max"])
        check_min(self, "ddpo.", {"stat_buffer_size": 0, "stat_min_count": 1, "log_images": 0})
        check_prompt_source(self.prompts, "ddpo.prompts")


@dataclass(kw_only=True)
class DDPOConfig(TrainerConfig):
    """`deradiff train ddpo`: KL-regularized DDPO on a LoRA; writes output_dir/lora like every trainer."""

    sample: SampleSection = option(factory=SampleSection, help="DDIM sampler for trajectories")
    ddpo: DDPOSection = option(factory=DDPOSection, help="objective: reward, beta, PPO")

    @property
    def train_timesteps(self) -> int:
        """DDIM steps trained per sample (at least one)."""
        return max(1, math.ceil(self.sample.num_steps * self.ddpo.timestep_fraction))

    @property
    def samples_per_round(self) -> int:
        """Trajectories one process samples per round."""
        return self.sample.batch_size * self.sample.batches_per_round

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per round: inner epochs x micro-batches / accumulation."""
        per_step = self.train.micro_batch_size * self.train.gradient_accumulation_steps
        return self.ddpo.inner_epochs * self.samples_per_round // per_step

    def validate(self) -> None:
        per_step = self.train.micro_batch_size * self.train.gradient_accumulation_steps
        if self.samples_per_round % self.sample.images_per_prompt:
            raise ConfigError(
                f"sample.images_per_prompt ({self.sample.images_per_prompt}) must divide the "
                f"{self.samples_per_round} trajectories per round (sample.batch_size x sample.batches_per_round)"
            )
        if self.samples_per_round % per_step:
            raise ConfigError(
                f"sample.batch_size x sample.batches_per_round ({self.samples_per_round}) must be a multiple of "
                f"train.micro_batch_size x train.gradient_accumulation_steps ({per_step})"
            )
        n = self.steps_per_round
        if self.train.max_steps % n:
            raise ConfigError(f"config key 'train.max_steps' must be a multiple of the {n} optimizer steps per round")
        if self.train.checkpoint_every % n:
            raise ConfigError(
                f"config key 'train.checkpoint_every' must be a multiple of the {n} optimizer steps per round "
                "(checkpoints sit between rounds, so resume is exact)"
            )
