"""DDPO math: Gaussian transition log-densities, the per-step KL to the reference, the PPO clipped
objective and per-prompt advantage normalisation. Pure torch; no pipeline, accelerate or I/O here.

References: Black et al., "Training Diffusion Models with Reinforcement Learning" (DDPO, arXiv 2305.13301;
kvablack/ddpo-pytorch); Fan et al., "DPOK" (arXiv 2305.16381) for the KL-regularised objective.

KL convention (the one `beta` means everywhere in deradiff)
-----------------------------------------------------------
Each DDIM step with eta > 0 is a Gaussian transition p(x_{t-1} | x_t) = N(mu(x_t), sigma_t^2 I). The
aligned model and the reference (same UNet, adapter off) share sigma_t, so at the same x_t

    KL_t(x_t) = || mu_aligned(x_t) - mu_ref(x_t) ||^2 / (2 sigma_t^2)        (nats, SUMMED over latent dims)

and the path KL is the sum of KL_t over the sampled steps (nats per image). Training maximises

    J(theta) = E[ reward(x_0) ] - beta * E[ sum_t KL_t(x_t) ]

with rewards in their own units. This is KL(p_theta || p_ref) of the whole sampling chain, whose optimum
is p* ∝ p_ref * exp(reward / beta); so a model trained at beta realigned with lambda = beta / beta_target
(DeRaDiff) emulates training at beta_target with the same reward and the same sampler.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(dim=1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, summed over all non-batch dims (nats). `std` broadcasts."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return _sum_except_batch(elementwise.expand_as(mean))


def gaussian_kl_same_std(mean_a: torch.Tensor, mean_r: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean_a, std^2 I) || N(mean_r, std^2 I)) per sample = ||mean_a - mean_r||^2 / (2 std^2), nats.

    Closed form (no sampling noise) because both transitions start from the same x_t with the same sigma_t.
    """
    std = torch.as_tensor(std, dtype=mean_a.dtype, device=mean_a.device)
    return _sum_except_batch(((mean_a - mean_r) ** 2 / (2 * std**2)).expand_as(mean_a))


def kl_regularized_reward(reward: torch.Tensor, path_kl: torch.Tensor, beta: float) -> torch.Tensor:
    """reward - beta * KL(path): the per-sample objective that `kl_in: reward` normalises into advantages."""
    return reward - beta * path_kl


@dataclass
class PPOStats:
    """The scalars DDPO logs per update (detached)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_clipped_loss(
    advantages: torch.Tensor, log_ratio: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, PPOStats]:
    """PPO's pessimistic clipped surrogate (to minimise): mean(max(-A r, -A clip(r, 1-c, 1+c))).

    `log_ratio` = log p_theta - log p_old per sample. DDPO uses per-dimension mean log-probs here, which is
    why the published clip range is as small as 1e-4. Also returns the clip fraction and approx KL
    (0.5 * E[log_ratio^2], as in ddpo-pytorch) for logging.
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = PPOStats(
            loss=loss.detach(),
            clip_fraction=((ratio - 1.0).abs() > clip_range).float().mean(),
            approx_kl=0.5 * (log_ratio.detach() ** 2).mean(),
        )
    return loss, stats


class PerPromptStatTracker:
    """Normalises rewards into advantages with per-prompt mean/std (DDPO's per-prompt stat tracking).

    Why per prompt: some prompts are simply easier; subtracting each prompt's own baseline keeps the
    policy gradient about *how* to draw a prompt, not *which* prompts score high. Each prompt keeps its
    last `buffer_size` rewards across sampling rounds; until it has `min_count` of them the whole batch's
    statistics are used instead. `buffer_size=0` disables per-prompt tracking (batch statistics always).
    The state is plain lists so a checkpoint can carry it (`state_dict` / `load_state_dict`).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this round's rewards; return (advantages, std used per sample), both shaped like `rewards`."""
        values = rewards.detach().double().cpu()
        if len(prompts) != len(values):
            raise ValueError(f"{len(prompts)} prompts but {len(values)} rewards")
        mean = torch.empty_like(values)
        std = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order (deterministic)
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            if self.buffer_size <= 0:
                mean[idx], std[idx] = batch_mean, batch_std
                continue
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(values[idx].tolist())
            if len(buf) < self.min_count:
                mean[idx], std[idx] = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=torch.float64)
                mean[idx], std[idx] = hist.mean(), hist.std(unbiased=False)
        std = std + self.eps
        advantages = (values - mean) / std
        return advantages.to(rewards.dtype).to(rewards.device), std.to(rewards.dtype).to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}
