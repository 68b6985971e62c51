"""One DDPO round: sample trajectories with the LoRA on, score them, turn rewards into advantages; then the
per-(micro-batch, timestep) PPO loss the shared `Trainer.accumulate` backpropagates.

Everything random in a round (prompts, sampler noise, PPO shuffles) is drawn from one generator keyed by
(seed, round, rank), and the per-prompt reward history is checkpointed with accelerate, so a run resumed
at a round boundary continues exactly like an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from deradiff.losses.ddpo import (
    PerPromptStatTracker,
    kl_regularized_reward,
    ppo_clipped_loss,
)
from deradiff.models.lora import adapter_disabled, unwrap
from deradiff.models.training import training_resolution
from deradiff.sampling.conditions import Conditions, encode
from deradiff.sampling.ddim import Transition, ddim_scheduler, ddim_transition
from deradiff.sampling.guidance import guided, unet_call
from deradiff.sampling.latents import decode, latent_shape
from deradiff.sampling.rollout import Trajectory, sample_with_logprob
from deradiff.training.config import DDPOConfig
from deradiff.training.determinism import step_generator

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


@dataclass
class Round:
    """This process's samples of one round: what the PPO updates read (all on the training device)."""

    index: int
    prompts: list[str]
    latents: torch.Tensor  # [N, T+1, C, h, w]
    log_probs: torch.Tensor  # [N, T], summed over latent dims
    timesteps: torch.Tensor  # [T]
    conditions: Conditions  # N rows
    advantages: torch.Tensor  # [N], normalised and clipped
    reward_scale: float  # the round's mean normalising std: scales the KL loss term like the advantages
    sample_order: torch.Tensor  # [inner_epochs, N] PPO shuffles
    step_order: torch.Tensor  # [inner_epochs, N, train_timesteps] which DDIM steps each sample trains
    metrics: dict[str, float]
    images: torch.Tensor  # a few decoded samples for logging
    rewards: torch.Tensor


class DDPOEngine:
    """Holds the model pieces a round needs; `sample_round` and `micro_loss` are the two entry points."""

    def __init__(self, cfg: DDPOConfig, pipe: Any, model: torch.nn.Module, accelerator: Any,
                 reward_fn: RewardFn, prompts: list[str], stats: PerPromptStatTracker) -> None:
        self.cfg, self.pipe, self.model, self.acc = cfg, pipe, model, accelerator
        self.reward_fn, self.prompts, self.stats = reward_fn, prompts, stats
        sched_config = dict(pipe.scheduler.config)
        if cfg.model.prediction_type != "auto":
            sched_config["prediction_type"] = cfg.model.prediction_type
        self.scheduler = ddim_scheduler(sched_config, cfg.sample.num_steps)
        self.resolution = training_resolution(cfg, pipe)
        self.latent_shape = latent_shape(pipe, self.resolution, self.resolution)
        self.latent_dims = self.latent_shape[0] * self.latent_shape[1] * self.latent_shape[2]

    # ---- sampling ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditions:
        """The prompts' conditioning (fp32) and, with CFG, the negative prompt's."""
        s = self.cfg.sample
        conditions = encode(self.pipe, prompts, s.guidance_scale, (self.resolution, self.resolution), self.acc.device,
                            s.negative_prompt)
        return conditions.map(lambda x: x.float())

    @torch.no_grad()
    def sample_round(self, index: int) -> Round:
        """Sample, score and normalise one round; rewards/KL are gathered so statistics are global."""
        cfg, rank = self.cfg, self.acc.process_index
        gen = step_generator(cfg.train.seed, index, rank)
        n = cfg.samples_per_round
        k = cfg.sample.images_per_prompt
        prompt_ids = torch.randint(len(self.prompts), (n // k,), generator=gen).repeat_interleave(k)
        prompts = [self.prompts[i] for i in prompt_ids.tolist()]
        size = cfg.sample.batch_size
        parts = [self._sample_batch(prompts[start : start + size], gen) for start in range(0, n, size)]
        trajs, rewards = [t for t, _ in parts], torch.cat([r for _, r in parts])
        latents, log_probs, kl = (torch.cat([getattr(t, f) for t in trajs]) for f in ("latents", "log_probs", "kl"))
        conditions = Conditions.cat([t.conditions for t in trajs])
        path_kl = kl.sum(dim=1)
        adv, reward_scale, metrics = self._advantages(prompt_ids, rewards, path_kl)
        orders = self._ppo_orders(gen, n)
        images = decode(self.pipe.vae, latents[: cfg.ddpo.log_images, -1]) if cfg.ddpo.log_images else latents[:0]
        return Round(index, prompts, latents, log_probs, self.scheduler.timesteps.clone(), conditions,
                     adv, reward_scale, *orders, metrics, images, rewards)

    def _sample_batch(self, prompts: list[str], gen: torch.Generator) -> tuple[Trajectory, torch.Tensor]:
        """Trajectories with the LoRA on (KL to the adapter-off reference per step) and their rewards."""
        with self.acc.autocast():
            traj = sample_with_logprob(
                unwrap(self.model), self.scheduler, self.encode(prompts),
                num_steps=self.cfg.sample.num_steps, eta=self.cfg.sample.eta,
                guidance_scale=self.cfg.sample.guidance_scale, latent_shape=self.latent_shape,
                generator=gen, reference=lambda: adapter_disabled(self.model),
            )
        images = decode(self.pipe.vae, traj.final)
        rewards = torch.as_tensor(self.reward_fn(images, prompts), dtype=torch.float32).to(self.acc.device)
        return traj, rewards

    def _advantages(self, prompt_ids: torch.Tensor, rewards: torch.Tensor, path_kl: torch.Tensor
                    ) -> tuple[torch.Tensor, float, dict[str, float]]:
        """Global (all-rank) advantages of reward (- beta*KL when kl_in=reward); returns this rank's slice."""
        d = self.cfg.ddpo
        all_ids = self.acc.gather(prompt_ids.to(self.acc.device)).cpu()
        all_r, all_kl = self.acc.gather(rewards).cpu(), self.acc.gather(path_kl.float()).cpu()
        objective = kl_regularized_reward(all_r, all_kl, d.beta)
        signal = objective if d.kl_in == "reward" else all_r
        adv, std = self.stats.update([self.prompts[i] for i in all_ids.tolist()], signal)
        n, rank = len(prompt_ids), self.acc.process_index
        mine = slice(rank * n, (rank + 1) * n)
        metrics = {
            "reward_mean": float(all_r.mean()), "reward_std": float(all_r.std(unbiased=False)),
            "kl": float(all_kl.mean()), "kl_max": float(all_kl.max()), "objective": float(objective.mean()),
        }
        adv = adv[mine].clamp(-d.adv_clip_max, d.adv_clip_max)
        return adv.to(self.acc.device), float(std.mean()), metrics

    def _ppo_orders(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per inner epoch: a sample shuffle, and per sample a random subset/order of the DDIM steps."""
        epochs, steps, k = self.cfg.ddpo.inner_epochs, self.cfg.sample.num_steps, self.cfg.train_timesteps
        sample_order = torch.stack([torch.randperm(n, generator=gen) for _ in range(epochs)])
        step_order = torch.stack([
            torch.stack([torch.randperm(steps, generator=gen)[:k] for _ in range(n)]) for _ in range(epochs)
        ])
        return sample_order, step_order

    # ---- the PPO update ---------------------------------------------------------------------------------
    def micro_loss(self, rnd: Round, micro_in_round: int) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO (+ beta*KL if kl_in=loss) on one micro-batch at one of its trained DDIM steps."""
        cfg = self.cfg
        batch, j = divmod(micro_in_round, cfg.train_timesteps)
        epoch, b = divmod(batch, cfg.samples_per_round // cfg.train.micro_batch_size)
        mb = cfg.train.micro_batch_size
        idx = rnd.sample_order[epoch, b * mb : (b + 1) * mb]
        step_idx = rnd.step_order[epoch, idx, j]
        x_t, x_prev = rnd.latents[idx, step_idx], rnd.latents[idx, step_idx + 1]
        t = rnd.timesteps[step_idx]
        conditions = rnd.conditions.rows(idx)
        eps = guided(unet_call(self.model), x_t, t.to(x_t.device), conditions, cfg.sample.guidance_scale)
        step = ddim_transition(self.scheduler, eps, t, x_t, cfg.sample.eta)
        log_prob = step.log_prob(x_prev)
        # Per-dimension log-ratio (as DDPO): what the published clip_range 1e-4 is tuned for.
        log_ratio = (log_prob - rnd.log_probs[idx, step_idx]) / self.latent_dims
        loss, stats = ppo_clipped_loss(rnd.advantages[idx], log_ratio, cfg.ddpo.clip_range)
        metrics = {"ppo_loss": float(stats.loss), "clip_fraction": float(stats.clip_fraction),
                   "approx_kl": float(stats.approx_kl)}
        if cfg.ddpo.kl_in == "loss" and cfg.ddpo.beta > 0:
            kl_term = self._kl_term(step, x_t, t, conditions, rnd.reward_scale)
            loss = loss + kl_term
            metrics["kl_loss"] = float(kl_term.detach())
        return loss, metrics

    def _kl_term(self, step: Transition, x_t: torch.Tensor, t: torch.Tensor, conditions: Conditions,
                 reward_scale: float) -> torch.Tensor:
        """beta * KL_t / (D * std): the same scale as the per-dimension, std-normalised PPO term.

        PPO's gradient at ratio 1 is -A/D * grad log p with A = (r - baseline)/std, i.e. grad E[r] / (D std);
        dividing beta*KL by D*std keeps reward and KL in the proportion of E[r] - beta*KL. `std` is the
        round's mean normalising std (not each prompt's own, which can be ~0 when a prompt's rewards tie).
        The gradient flows through mu_lora at fixed x_t (pathwise; the dependence of x_t on theta is not
        differentiated, as in DPOK).
        """
        with torch.no_grad(), adapter_disabled(self.model) as base:
            ref_eps = guided(unet_call(base), x_t, t.to(x_t.device), conditions, self.cfg.sample.guidance_scale)
            ref = ddim_transition(self.scheduler, ref_eps, t, x_t, self.cfg.sample.eta)
        kl = step.kl_to(ref)
        return self.cfg.ddpo.beta * kl.mean() / (self.latent_dims * reward_scale)
