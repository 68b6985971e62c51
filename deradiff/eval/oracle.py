"""The exact KL-regularized optimum as ground truth, by self-normalized importance weighting of base samples.

For an objective E_p[r] - beta * KL(p || p_ref) with beta in reward units, the optimum is
p*_beta ∝ p_ref * exp(r / beta). From N samples of p_ref drawn with the training sampler, with weights
w_i = exp(r_i / beta):
  E*[m] = sum_i w_i m_i / sum_i w_i,   log Z = log mean_i exp(r_i / beta),   KL(p* || p_ref) = E*[r] / beta - log Z,
and for any model p with samples from the same sampler: KL(p || p*) = KL(p || p_ref) - E_p[r] / beta + log Z.
The path KL of p* equals its image KL (the tilt depends on the final image only). Everything here works in log
space (beta = 1e-4 with rewards of order 1 would overflow exp) and accepts multiplicities (counts of a bootstrap
resample) so the bootstrap reuses these exact estimators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from deradiff.eval.metrics import weighted_pairwise_mean


def log_weights(rewards: torch.Tensor, beta: float, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalized log importance weights r / beta (+ log count; a count of 0 drops the sample), float64."""
    if beta <= 0 or not math.isfinite(beta):
        raise ValueError(f"oracle beta must be a finite number > 0, got {beta}")
    logw = rewards.double() / beta
    return logw if counts is None else logw + counts.double().log()


def effective_sample_size(logw: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2, from log weights: N for uniform weights, 1 when one sample carries all the weight."""
    return float(torch.exp(2 * torch.logsumexp(logw, 0) - torch.logsumexp(2 * logw, 0)))


@dataclass
class Tilted:
    """The optimum at one beta for one prompt: weighted means of the given metrics, its KL to p_ref, log Z, ESS."""

    means: dict[str, float]
    kl: float
    log_z: float
    ess: float


def tilt(rewards: torch.Tensor, beta: float, metrics: dict[str, torch.Tensor] | None = None,
         distances: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> Tilted:
    """Estimate the optimum p_ref * exp(r / beta) from base samples with rewards `rewards` [N].

    `metrics` maps names to per-sample values [N] (weighted means come back under the same names);
    `distances` [N, N] gives the weighted mean pairwise distance as 'diversity'. `counts` [N] are sample
    multiplicities (None: each sample once).
    """
    logw = log_weights(rewards, beta, counts)
    w = torch.softmax(logw, 0)
    total = float(counts.double().sum()) if counts is not None else float(len(rewards))
    log_z = float(torch.logsumexp(logw, 0)) - math.log(total)
    mean_r = float((w * rewards.double()).sum())
    means = {k: float((w * v.double()).sum()) for k, v in (metrics or {}).items()}
    if distances is not None:
        means["diversity"] = weighted_pairwise_mean(distances, w)
    return Tilted(means=means, kl=mean_r / beta - log_z, log_z=log_z, ess=effective_sample_size(logw))


def kl_to_optimum(path_kl: float, mean_reward: float, beta: float, log_z: float) -> float:
    """KL(p || p*_beta) = KL(p || p_ref) - E_p[r] / beta + log Z: how far a model is from the optimum at beta
    (0 at the optimum; its samples' path KL must come from the sampler the oracle's base samples used)."""
    return path_kl - mean_reward / beta + log_z


def oracle_name(beta: float) -> str:
    return f"oracle-b{beta:g}"


def applicability(anchor: Any, retrained: Sequence[Any], sampler: dict[str, float]) -> str | None:
    """Why no oracle applies to these LoRAs and this eval sampler (None: it applies).

    The oracle needs beta in reward units for one known reward, and the eval must sample exactly as training
    did (the KL and the optimum are those of the training sampler's paths).
    """
    if anchor.beta_units != "reward":
        return (f"no oracle: the anchor was trained with {anchor.method}, whose beta is not in reward units "
                "(Diffusion-DPO's beta scales an implicit reward, the ELBO-surrogate log-ratio of a preference model, "
                "not an explicit reward r), so p_ref * exp(r / beta) is not its optimum; train with ddpo for one")
    for info in retrained:
        if (info.beta_units, info.reward, info.sampler) != (anchor.beta_units, anchor.reward, anchor.sampler):
            return f"no oracle: retrained LoRA '{info.path}' was trained with another reward, sampler or beta units than the anchor"
    if anchor.sampler is None or anchor.reward is None:
        return "no oracle: the anchor's metadata does not record its reward and sampler"
    trained = {k: float(anchor.sampler[k]) for k in ("num_steps", "eta", "guidance_scale")}
    if trained != {k: float(v) for k, v in sampler.items()}:
        return (f"no oracle: the eval samples with {sampler} but the LoRAs were trained with {trained}; "
                "set sampling.steps / eta / guidance_scale to the training sampler")
    return None
