"""The pieces of the Diffusion-DPO trainer: preference data and the per-micro-batch loss (model loading:
`deradiff.models.training`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deradiff.data.cache import CachedPairs, Encoder, LivePairs, build_cache, cache_key
from deradiff.models.family import is_sdxl
from deradiff.data.pickapic import CleaningStats, data_fingerprint, load_preference_pairs
from deradiff.errors import DeradiffError
from deradiff.losses.dpo import diffusion_dpo_loss
from deradiff.models.lora import adapter_disabled
from deradiff.models.training import training_resolution
from deradiff.training.determinism import rank_micro_batch, step_generator
from deradiff.training.trainer import Trainer


def prepare_pairs(cfg: Any, pipe: Any, base: str, trainer: Trainer) -> tuple[Any, CleaningStats, str]:
    """Load + clean the preference data (generating tiny-world data if asked) and wrap it as a PairSource."""
    source = Path(cfg.data.source).expanduser()
    if cfg.data.generate_if_missing and not source.exists():
        from deradiff.data.prefs import generate_preferences

        generate_preferences(base, str(source), cfg.data.generate, device=trainer.device)
    pairs, stats = load_preference_pairs(cfg.data.source, cfg.data.split, cfg.data.max_pairs)
    fingerprint = data_fingerprint(cfg.data.source, stats)
    resolution = training_resolution(cfg, pipe)
    encoder = Encoder(pipe, resolution, trainer.device, trainer.weight_dtype, seed=cfg.train.seed)
    if not cfg.data.cache_latents:
        return LivePairs(pairs, encoder), stats, fingerprint
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else _default_cache_root(source)
    key = cache_key(fingerprint, base, resolution, f"{cfg.model.vae}|{trainer.weight_dtype}|{cfg.train.seed}")
    cached = build_cache(pairs, encoder, root / key, batch_size=cfg.data.encode_batch_size,
                         progress=trainer.accelerator.is_main_process)
    return cached, stats, fingerprint


def _default_cache_root(source: Path) -> Path:
    if source.exists():
        return (source if source.is_dir() else source.parent) / ".deradiff-cache"
    return Path.home() / ".cache" / "deradiff" / "pairs"


class DPOStep:
    """`micro_loss(micro_step) -> (loss, metrics)` for the shared Trainer."""

    def __init__(self, cfg: Any, pipe: Any, unet: torch.nn.Module, pairs: CachedPairs | LivePairs, trainer: Trainer):
        from diffusers import DDPMScheduler

        self.cfg, self.unet, self.pairs, self.trainer = cfg, unet, pairs, trainer
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        ptype = cfg.model.prediction_type
        self.prediction_type = self.scheduler.config.prediction_type if ptype == "auto" else ptype
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DeradiffError(f"Diffusion-DPO supports epsilon or v_prediction models, not {self.prediction_type!r}")
        self.resolution = training_resolution(cfg, pipe)
        self.sdxl = is_sdxl(pipe)
        if len(pairs) < cfg.train.micro_batch_size * trainer.world_size:
            raise DeradiffError(
                f"{len(pairs)} preference pairs are fewer than one global micro-batch "
                f"({cfg.train.micro_batch_size} x {trainer.world_size} processes)"
            )

    def __call__(self, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        tr, cfg = self.trainer, self.cfg
        idx = rank_micro_batch(len(self.pairs), micro_step, cfg.train.micro_batch_size, tr.world_size, tr.rank,
                               cfg.train.seed)
        batch = self.pairs.get(idx.tolist(), tr.device)
        inputs, target = self.noisy_inputs(batch, micro_step)
        model_pred = self.unet(**inputs).sample
        with torch.no_grad(), adapter_disabled(self.unet) as reference:
            ref_pred = reference(**inputs).sample
        out = diffusion_dpo_loss(model_pred, ref_pred, target, cfg.dpo.beta, cfg.dpo.loss_type)
        return out.loss, out.metrics()

    def noisy_inputs(self, batch: dict[str, torch.Tensor], micro_step: int) -> tuple[dict[str, Any], torch.Tensor]:
        """UNet kwargs for [winners; losers] sharing noise and timestep, and the regression target."""
        tr, dtype = self.trainer, self.trainer.weight_dtype
        latents = torch.cat([batch["latents_w"], batch["latents_l"]]).float()
        n = batch["latents_w"].shape[0]
        g = step_generator(self.cfg.train.seed, micro_step, tr.rank)
        noise = torch.randn(batch["latents_w"].shape, generator=g).repeat(2, 1, 1, 1).to(tr.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=g).repeat(2).to(tr.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = regression_target(self.scheduler, self.prediction_type, latents, noise, t)
        inputs: dict[str, Any] = {
            "sample": noisy.to(dtype),
            "timestep": t,
            "encoder_hidden_states": batch["prompt_embeds"].repeat(2, 1, 1).to(dtype),
        }
        if self.sdxl:
            inputs["added_cond_kwargs"] = {
                "text_embeds": batch["pooled_prompt_embeds"].repeat(2, 1).to(dtype),
                "time_ids": torch.cat([batch["time_ids_w"], batch["time_ids_l"]]).to(dtype),
            }
        return inputs, target


def regression_target(scheduler: Any, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the scheduler's own velocity (v-prediction), so the
    target follows the noise schedule the model was trained with."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r} (expected epsilon or v_prediction)")
