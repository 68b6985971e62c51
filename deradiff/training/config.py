"""Config sections shared by every trainer (DPO, DDPO): one definition, documented once, here.

A trainer schema extends `TrainerConfig` (output_dir, model, lora, optim, train, tracker) with its own
sections, e.g. ``class DPOConfig(TrainerConfig): data: DataSection; dpo: DPOSection``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deradiff.config import check_file, check_min, check_positive, check_seed, option
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
