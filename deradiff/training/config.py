"""Every trainer's config schema, in one place: the sections all trainers share and each method's own.

A trainer schema extends `TrainerConfig` (output_dir, model, lora, optim, train, tracker) with its own
sections, e.g. ``class DPOConfig(TrainerConfig): data: DataSection; dpo: DPOSection``. The trainers
(`dpo.py`, `ddpo.py`, `reward_grad.py`) import their schema from here.

Light to import (dataclasses only, no torch or diffusers; the reward registry loads inside `validate`): the
CLI's `--help` builds its options from these classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from deradiff.config import check_file, check_min, check_positive, check_prompt_source, check_seed, option
from deradiff.data.config import PrefsSection
from deradiff.errors import ConfigError


@dataclass
class ModelSection:
    """Which base pipeline to adapt."""

    pretrained: str = option(
        "tiny", "base model: 'tiny' (embedded tiny world), a local diffusers folder (relative: to the current "
                "directory) or a hub id")
    revision: str | None = option(None, "hub revision of the base model")
    variant: str | None = option(None, "weights variant to load, e.g. fp16")
    vae: str | None = option(None, "replacement VAE folder or hub id (SDXL fp16: madebyollin/sdxl-vae-fp16-fix)")
    resolution: int | None = option(None, "training resolution in pixels (null: the model's native size)")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = option(
        "auto", "what the UNet predicts; auto: read the scheduler config"
    )

    def validate(self) -> None:
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"config key 'model.resolution' must be a positive multiple of 8, got {self.resolution}")


@dataclass
class LoraSection:
    """The trained adapter (the base stays frozen)."""

    rank: int = option(4, "LoRA rank r")
    alpha: float | None = option(None, "LoRA alpha (scale alpha/r); null: equal to rank")
    target_modules: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "UNet module names that get LoRA")

    def validate(self) -> None:
        check_min(self, "lora.", {"rank": 1})
        check_positive(self, "lora.", ["alpha"])
        if not self.target_modules:
            raise ConfigError("config key 'lora.target_modules' must name at least one UNet module")


@dataclass
class OptimSection:
    """AdamW and its learning-rate schedule."""

    lr: float = option(1e-4, "peak learning rate")
    scale_lr: bool = option(False, "multiply lr by the effective batch size (Diffusion-DPO's recipe does)")
    weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = option(False, "bitsandbytes 8-bit AdamW (needs `pip install bitsandbytes`)")
    max_grad_norm: float | None = option(1.0, "clip gradients to this global norm (null: no clipping)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = option(
        "constant_with_warmup", "learning-rate schedule (diffusers get_scheduler name)"
    )
    warmup_steps: int = option(0, "linear warmup steps")

    def validate(self) -> None:
        check_positive(self, "optim.", ["lr", "adam_eps", "max_grad_norm"])
        check_min(self, "optim.", {"weight_decay": 0, "warmup_steps": 0})
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"config key 'optim.{key}' must be in [0, 1), got {getattr(self, key)}")


@dataclass
class TrainSection:
    """The loop: batch shape, length, precision, checkpoints, resume."""

    max_steps: int = option(100, "optimizer steps to train")
    micro_batch_size: int = option(4, "samples (DPO: preference pairs) per process per forward")
    gradient_accumulation_steps: int = option(1, "micro-batches accumulated per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "autocast precision; frozen base weights are cast to it")
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward (less memory, slower)")
    seed: int = option(0, "seed for LoRA init, data order, noise and timesteps (runs are deterministic)")
    checkpoint_every: int = option(0, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many most recent checkpoints to keep (0: keep all)")
    resume_from: str | None = option(None, "'latest' or a checkpoint folder to continue from exactly")
    overwrite: bool = option(False, "without resume_from: clear an earlier run's checkpoints/ and lora/ in output_dir (else refused)")
    log_every: int = option(1, "log scalars every N steps")
    allow_tf32: bool = option(True, "allow TF32 matmuls on Ampere+ GPUs")
    deepspeed_config: str | None = option(
        None, "DeepSpeed JSON (e.g. the repo's launch/zero2.json) when not launched with `accelerate launch "
              "--use_deepspeed`", relative_to_yaml=True,
    )

    def validate(self) -> None:
        check_min(self, "train.", {"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
                                   "log_every": 1, "checkpoint_every": 0, "keep_checkpoints": 0})
        check_seed(self.seed, "train.seed")
        if self.deepspeed_config:
            check_file(self.deepspeed_config, "train.deepspeed_config", "a DeepSpeed JSON file")


@dataclass
class TrackerSection:
    """Experiment tracking (Weights & Biases or nothing)."""

    backend: Literal["wandb", "none"] = option("wandb", "tracker to log to")
    mode: Literal["online", "offline", "disabled"] = option(
        "offline", "W&B mode; online falls back to offline with a warning if W&B cannot start"
    )
    project: str = option("deradiff", "W&B project")
    entity: str | None = option(None, "W&B entity (team)")
    run_name: str | None = option(None, "W&B run name (default: the output folder name)")
    tags: list[str] = option([], "W&B tags")


@dataclass(kw_only=True)  # keyword-only: subclasses may add required sections after these defaults
class TrainerConfig:
    """The sections every `deradiff train <method>` config has."""

    output_dir: str = option(help="run folder: lora/, checkpoints/, summary.json, W&B files (relative: to the current directory)")
    model: ModelSection = option(factory=ModelSection, help="base model")
    lora: LoraSection = option(factory=LoraSection, help="LoRA adapter")
    optim: OptimSection = option(factory=OptimSection, help="optimizer")
    train: TrainSection = option(factory=TrainSection, help="loop, precision, checkpoints (max_steps: optimizer steps)")
    tracker: TrackerSection = option(factory=TrackerSection, help="experiment tracking")


# --- Diffusion-DPO (`deradiff train dpo`)

@dataclass
class DataSection:
    """Where the preference pairs come from and how they are encoded."""

    source: str = option(help="parquet file/folder, saved arrow folder, or hub dataset with the Pick-a-Pic schema")
    split: str = option("train", "dataset split (hub / DatasetDict sources)")
    max_pairs: int | None = option(None, "use at most this many pairs (after dropping ties)")
    cache_latents: bool = option(True, "encode VAE latents + text embeddings once to disk and train from the cache")
    cache_dir: str | None = option(None, "cache folder (default: .deradiff-cache next to the data)")
    encode_batch_size: int = option(16, "rows per VAE/text-encoder batch while caching")
    generate: PrefsSection = option(factory=PrefsSection, help="tiny-world generation if `source` is missing")
    generate_if_missing: bool = option(False, "generate `source` with the tiny-world recipe when it does not exist")

    def validate(self) -> None:
        self.generate.check("data.generate.")


@dataclass
class DPOSection:
    """The Diffusion-DPO objective."""

    beta: float = option(5000.0, "KL strength (paper convention with the 1/2 explicit; diffusers' beta_dpo 2500 = 5000 here)")
    loss_type: Literal["sigmoid", "hinge"] = option("sigmoid", "sigmoid: DPO; hinge: SLiC-style relu(1 - margin)")

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"config key 'dpo.beta' must be > 0, got {self.beta}")


@dataclass(kw_only=True)
class DPOConfig(TrainerConfig):
    """`deradiff train dpo`: one LoRA at one beta."""

    data: DataSection = option(help="preference data")
    dpo: DPOSection = option(factory=DPOSection, help="DPO objective")


# --- DDPO (`deradiff train ddpo`): the shared sections plus `sample` (the DDIM sampler) and `ddpo` (the objective).
# Loop shape (per process): a *round* samples `sample.batch_size * sample.batches_per_round` trajectories
# with the LoRA on, scores them, and then runs `ddpo.inner_epochs` passes of PPO updates over them in
# micro-batches of `train.micro_batch_size`, each micro-batch once per trained timestep. One optimizer step
# accumulates `train.gradient_accumulation_steps` micro-batches x all trained timesteps, so a round is
# `steps_per_round` optimizer steps and `train.max_steps` counts optimizer steps (a multiple of it).

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


# --- reward backprop (`deradiff train reward_grad`): DDPO's sampler (ChainSection) and beta (BETA_HELP)

@dataclass
class RewardGradSection:
    """The objective E[reward] - beta * KL, differentiated through the sampling chain."""

    reward: str = option("vividness", "a differentiable reward from deradiff.rewards (e.g. vividness)")
    reward_options: dict[str, Any] = option({}, "keyword arguments for the reward")
    prompts: str | list[str] = option(
        "world:train", "prompt source: 'world:train' / 'world:eval' (tiny world), a .txt file (one per line), or a list",
        relative_to_yaml=True)
    beta: float = option(0.0, BETA_HELP)

    def validate(self) -> None:
        from deradiff.rewards import check_reward_name, is_differentiable

        check_prompt_source(self.prompts, "reward_grad.prompts")
        check_reward_name(self.reward, "reward_grad.reward")
        if not is_differentiable(self.reward):
            raise ConfigError(f"config key 'reward_grad.reward': '{self.reward}' is not differentiable "
                              "(reward_grad backpropagates through it); use ddpo for this reward")
        if self.beta < 0:
            raise ConfigError(f"config key 'reward_grad.beta' must be >= 0, got {self.beta}")


@dataclass(kw_only=True)
class RewardGradConfig(TrainerConfig):
    """`deradiff train reward_grad`: train.micro_batch_size chains per micro-batch, each backpropagated whole."""

    sample: ChainSection = option(factory=ChainSection, help="the DDIM sampler whose chains are trained on")
    reward_grad: RewardGradSection = option(factory=RewardGradSection, help="objective: reward and beta")
