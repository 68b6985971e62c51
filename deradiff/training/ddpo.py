"""KL-regularized DDPO (`deradiff train ddpo`): policy-gradient training of a LoRA on a reward, with the
objective E[reward] - beta * KL(LoRA chain || base chain); see `deradiff.losses.ddpo` for the exact KL.

The loop is the shared `Trainer` (accelerate, accumulation, checkpoints, resume, lock, tracker, LoRA save);
this module adds the round structure: every `steps_per_round` optimizer steps a new round of trajectories
is sampled (`DDPOEngine.sample_round`), and each optimizer step accumulates PPO losses over
`gradient_accumulation_steps` micro-batches x every trained DDIM step (`DDPOEngine.micro_loss`).

Usage::

    accelerate launch train/ddpo.py --config configs/tiny/ddpo.yaml ddpo.beta=0.01
    deradiff train ddpo --config configs/tiny/ddpo.yaml output_dir=runs/ddpo-b0.01 ddpo.beta=0.01
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deradiff.errors import DeradiffError
from deradiff.fileio import read_prompt_file
from deradiff.training.config import DDPOConfig
from deradiff.training.registry import TrainerSpec, register_trainer

if TYPE_CHECKING:
    from deradiff.training.tracking import Tracker


def run_ddpo(cfg: DDPOConfig, tracker: Tracker | None = None, group: str | None = None,
             job_type: str | None = None) -> dict[str, Any]:
    """Train and save `output_dir/lora`; returns the run summary. `tracker` overrides the config's (tests);
    `group`, `job_type`: the W&B run's (a study's, a tune's verify; None: the Trainer's defaults)."""
    from accelerate.utils import set_seed

    from deradiff.losses.ddpo import PerPromptStatTracker
    from deradiff.models.pipelines import resolve_base_model
    from deradiff.models.training import load_models
    from deradiff.rewards import get_reward
    from deradiff.training.ddpo_round import DDPOEngine
    from deradiff.training.trainer import Trainer

    # The accelerator accumulates micro-batches x trained DDIM steps per optimizer step.
    accum = cfg.train.gradient_accumulation_steps * cfg.train_timesteps
    loop_cfg = dataclasses.replace(cfg.train, gradient_accumulation_steps=accum)
    trainer = Trainer(loop_cfg, cfg.optim, cfg.tracker, cfg.output_dir, config=cfg,
                      tracker_override=tracker, sample_unit="sample_steps", group=group, job_type=job_type)
    set_seed(cfg.train.seed)
    reward_fn = get_reward(cfg.ddpo.reward, **cfg.ddpo.reward_options)  # fails fast (unknown name, missing weights) before any loading
    prompts = load_prompt_source(cfg.ddpo.prompts, "ddpo.prompts")
    base = resolve_base_model(cfg.model.pretrained)
    pipe, params = load_models(cfg, base, trainer)
    model = trainer.prepare(pipe.unet, params)
    stats = PerPromptStatTracker(cfg.ddpo.stat_buffer_size, cfg.ddpo.stat_min_count)
    trainer.accelerator.register_for_checkpointing(stats)  # the reward history survives resume
    engine = DDPOEngine(cfg, pipe, model, trainer.accelerator, reward_fn, prompts, stats)
    return trainer.run(_step_fn(cfg, trainer, engine), metadata=_metadata(cfg, base, engine))


def _step_fn(cfg: DDPOConfig, trainer: Any, engine: Any) -> Any:
    """One optimizer step; samples a new round whenever a round's worth of steps is done."""
    state: dict[str, Any] = {"round": None}
    per_step = trainer.train_cfg.gradient_accumulation_steps

    def step_fn(step: int) -> dict[str, float]:
        index, offset = divmod(step, cfg.steps_per_round)
        rnd = state["round"]
        if rnd is None or rnd.index != index:
            if offset:
                raise DeradiffError(f"cannot resume DDPO at step {step}: it is inside round {index} "
                                    f"({cfg.steps_per_round} steps per round); resume from a round boundary")
            rnd = state["round"] = engine.sample_round(index)
            _log_images(trainer, rnd, step)
        first = index * cfg.steps_per_round * per_step
        metrics = trainer.accumulate(step, lambda micro: engine.micro_loss(rnd, micro - first))
        return {**metrics, **rnd.metrics, "round": float(index)}

    return step_fn


def _log_images(trainer: Any, rnd: Any, step: int) -> None:
    if len(rnd.images) and trainer.tracker is not None:
        captions = [f"{p} | reward {r:.3f}" for p, r in zip(rnd.prompts, rnd.rewards.tolist())]
        trainer.tracker.log_images("samples", rnd.images, captions[: len(rnd.images)], step=step + 1)


def _metadata(cfg: DDPOConfig, base: str, engine: Any) -> dict[str, Any]:
    """What realign/eval read back from the LoRA (same keys as the DPO trainer where they overlap)."""
    return {
        "base_model": cfg.model.pretrained,
        "base_model_path": base,
        "method": "ddpo",
        "beta": cfg.ddpo.beta or None,  # 0 = unregularized DDPO: no beta for realign to rescale
        "beta_units": "reward",  # objective E[r] - beta * KL: the eval's oracle p_ref * exp(r / beta) applies
        "reward": cfg.ddpo.reward,
        "kl_in": cfg.ddpo.kl_in,
        "kl_convention": "sum over DDIM steps and latent dims of ||mu_lora - mu_ref||^2 / (2 sigma_t^2), nats",
        "prediction_type": engine.scheduler.config.prediction_type,
        "resolution": engine.resolution,
        "lr": cfg.optim.lr,
        "sampler": {"num_steps": cfg.sample.num_steps, "eta": cfg.sample.eta, "guidance_scale": cfg.sample.guidance_scale},
        "samples_per_round": cfg.samples_per_round,
        "steps_per_round": cfg.steps_per_round,
    }


def load_prompt_source(source: str | list[str], key: str = "ddpo.prompts") -> list[str]:
    """Prompts from a list, 'world:<split>' (tiny world) or a prompt file (`read_prompt_file`: one prompt a line,
    '#' comments); `key` is the config key the source came from, named in every error (reward_grad shares this
    loader)."""
    if isinstance(source, list):
        prompts = [p for p in source if p.strip()]
    elif source.startswith("world:"):
        from deradiff.world import load_prompts

        prompts = load_prompts(source.split(":", 1)[1])
    else:
        if not Path(source).is_file():
            raise DeradiffError(f"{key} '{source}' is neither 'world:train'/'world:eval' nor an existing text file")
        prompts = read_prompt_file(source, key)
    if not prompts:
        raise DeradiffError(f"{key} '{source}' holds no prompts")
    return prompts


register_trainer(TrainerSpec("ddpo", DDPOConfig, run_ddpo, "configs/tiny/ddpo.yaml", "KL-regularized DDPO (reward + beta)"))
