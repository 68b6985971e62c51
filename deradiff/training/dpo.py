"""Diffusion-DPO trainer (Wallace et al. 2023): LoRA on a frozen SD/SDXL UNet, reference = adapter off.

Per micro-batch of B preference pairs: winner and loser latents share one noise draw and one timestep;
the policy runs ONE forward on the concatenated [winners; losers] batch (2B rows); the reference runs
the same batch under `torch.no_grad()` with the adapter disabled. Loss and diagnostics come from
`deradiff.losses.dpo.diffusion_dpo_loss`. Everything else (accumulation, checkpoints, resume, logging)
is the shared `deradiff.training.trainer.Trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deradiff.config import check_min, check_positive, check_seed, option
from deradiff.errors import ConfigError, DeradiffError
from deradiff.training.config import TrainerConfig
from deradiff.training.registry import TrainerSpec, register_trainer


@dataclass
class PrefsSection:
    """How `data.source: tiny` preference pairs are generated when the file is missing (see `deradiff data prefs`)."""

    reward: str = option("vividness", "reward (deradiff.rewards registry) that labels the pairs")
    reward_options: dict[str, Any] = option({}, "keyword arguments for the reward, e.g. {model_path: /models/PickScore_v1}")
    temperature: float = option(0.05, "Bradley-Terry temperature: P(a preferred) = sigmoid((r_a - r_b) / T)")
    pairs_per_prompt: int = option(4, "image pairs sampled per train prompt")
    num_inference_steps: int = option(20, "sampling steps for the pair images")
    guidance_scale: float = option(3.0, "classifier-free guidance for the pair images")
    seed: int = option(0, "seed for sampling and labelling")

    def check(self, prefix: str) -> None:
        """Fails at config load, not after the model has sampled every pair; `prefix` is where this section sits
        in the user's config (the section does not know its own path), e.g. 'data.generate.'."""
        from deradiff.rewards import check_reward_name

        check_reward_name(self.reward, f"{prefix}reward")
        check_seed(self.seed, f"{prefix}seed")
        check_min(self, prefix, {"pairs_per_prompt": 1, "num_inference_steps": 1, "guidance_scale": 0})
        check_positive(self, prefix, ["temperature"])


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


def resolve_base_model(pretrained: str) -> str:
    """'tiny' → the embedded tiny world model folder; anything else as given."""
    if pretrained != "tiny":
        return pretrained
    from deradiff.world import TINY_MODEL_DIR

    if not (Path(TINY_MODEL_DIR) / "model_index.json").is_file():
        raise DeradiffError(f"the embedded tiny model is not built at {TINY_MODEL_DIR}; run `deradiff tiny pretrain` first")
    return str(TINY_MODEL_DIR)


def run_dpo(cfg: DPOConfig, tracker: Any = None) -> dict[str, Any]:
    """Train one Diffusion-DPO LoRA; returns the run summary (also written to output_dir/summary.json)."""
    import torch
    from accelerate.utils import set_seed

    from deradiff.training.dpo_step import DPOStep, load_models, prepare_pairs
    from deradiff.training.trainer import Trainer

    trainer = Trainer(cfg.train, cfg.optim, cfg.tracker, cfg.output_dir, config=cfg,
                      tracker_override=tracker, sample_unit="pairs")
    set_seed(cfg.train.seed)
    base = resolve_base_model(cfg.model.pretrained)
    pipe, params = load_models(cfg, base, trainer)
    with trainer.accelerator.main_process_first():
        pairs, stats, fingerprint = prepare_pairs(cfg, pipe, base, trainer)
    trainer.accelerator.print(stats.line())
    unet = trainer.prepare(pipe.unet, params)
    step = DPOStep(cfg, pipe, unet, pairs, trainer)
    metadata = {
        "base_model": cfg.model.pretrained if cfg.model.pretrained != "tiny" else "tiny",
        "base_model_path": base,
        "method": "dpo",
        "beta": cfg.dpo.beta,
        "beta_units": "implicit",  # scales an implicit (ELBO-surrogate) reward: no exp(r / beta) oracle
        "beta_convention": "paper (loss = -logsigmoid(-beta/2 * diff)); diffusers beta_dpo = beta/2",
        "loss_type": cfg.dpo.loss_type,
        "data_source": cfg.data.source,
        "data_fingerprint": fingerprint,
        "data_pairs": len(pairs),
        "prediction_type": step.prediction_type,
        "resolution": step.resolution,
        "lr": cfg.optim.lr,
    }
    del torch
    return trainer.run(lambda s: trainer.accumulate(s, step), metadata)


register_trainer(TrainerSpec("dpo", DPOConfig, run_dpo, "configs/tiny/dpo.yaml", "Diffusion-DPO on preference pairs"))
