"""Diffusion-DPO trainer (Wallace et al. 2023): LoRA on a frozen SD/SDXL UNet, reference = adapter off.

Per micro-batch of B preference pairs: winner and loser latents share one noise draw and one timestep;
the policy runs ONE forward on the concatenated [winners; losers] batch (2B rows); the reference runs
the same batch under `torch.no_grad()` with the adapter disabled. Loss and diagnostics come from
`deradiff.losses.dpo.diffusion_dpo_loss`. Everything else (accumulation, checkpoints, resume, logging)
is the shared `deradiff.training.trainer.Trainer`.
"""

from __future__ import annotations

from typing import Any

from deradiff.training.config import DPOConfig
from deradiff.training.registry import TrainerSpec, register_trainer


def run_dpo(cfg: DPOConfig, tracker: Any = None, group: str | None = None,
            job_type: str | None = None) -> dict[str, Any]:
    """Train one Diffusion-DPO LoRA; returns the run summary (also written to output_dir/summary.json). `group`,
    `job_type`: the W&B run's (a study's, a tune's verify; None: the Trainer's defaults)."""
    import torch
    from accelerate.utils import set_seed

    from deradiff.models.pipelines import resolve_base_model
    from deradiff.models.training import load_models
    from deradiff.training.dpo_step import DPOStep, prepare_pairs
    from deradiff.training.trainer import Trainer

    trainer = Trainer(cfg.train, cfg.optim, cfg.tracker, cfg.output_dir, config=cfg,
                      tracker_override=tracker, sample_unit="pairs", group=group, job_type=job_type)
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
