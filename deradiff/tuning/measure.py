"""Every model's metrics on the (prompt, seed) grid, with paired bootstrap intervals.

Metrics use the criterion's bare names: each scored reward, `path_kl` (to the base, nats over the chain),
`diversity` (mean pixel distance between seeds of a prompt), `kid` (KID to the base samples, same noise) and
'<metric>_delta' (the metric minus the base's).
The estimator reuses the eval's (`eval.uncertainty`): prompts and seeds are resampled once per replicate and
shared by every model, so differences between lambdas (and the verify comparison) are paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from deradiff.eval import metrics
from deradiff.eval.generate import Job, VariantSamples
from deradiff.eval.scoring import FeatureFn, RewardFn, score_rewards, standardized
from deradiff.eval.oracle import kl_to_optimum, oracle_name
from deradiff.eval.uncertainty import Counts, Interval, ModelEvidence, OracleEvidence, bootstrap, model_row, oracle_rows
from deradiff.tuning.config import DELTA, KL_TO_OPTIMUM, ORACLE


@dataclass
class Measured:
    """One model's per-sample numbers: metric -> [P, S], pixel distances [P, S, S], KID kernels (or None)."""

    per_sample: dict[str, torch.Tensor]
    distances: torch.Tensor
    kernels: tuple[torch.Tensor, torch.Tensor] | None = None  # (k(x, x), k(x, base)) over the P*S samples


def grid_shape(jobs: Sequence[Job]) -> tuple[int, int]:
    """(prompts, seeds) of prompt-major jobs."""
    prompts = len(dict.fromkeys(p for p, _ in jobs))
    return prompts, len(jobs) // prompts


def measure(samples: dict[str, VariantSamples], jobs: Sequence[Job], rewards: dict[str, RewardFn],
            features: FeatureFn | None, base: str) -> dict[str, Measured]:
    """Per-sample rewards, path KL, distances and (with features) KID kernels against `base`, for every model."""
    shape = grid_shape(jobs)
    prompts = [p for p, _ in jobs]
    feats = standardized({k: features(v.images) for k, v in samples.items()}, reference=base) if features else None
    out = {}
    for name, got in samples.items():
        scored = {key.removeprefix("reward_"): v for key, v in score_rewards(got.images, prompts, rewards).items()}
        per_sample = {k: v.reshape(shape) for k, v in {**scored, "path_kl": got.path_kl}.items()}
        images = got.images.unflatten(0, shape)
        distances = torch.stack([metrics.pairwise_distances(images[p]) for p in range(shape[0])])
        kernels = None
        if feats is not None:
            kernels = (metrics.polynomial_kernel(feats[name], feats[name]), metrics.polynomial_kernel(feats[name], feats[base]))
        out[name] = Measured(per_sample, distances, kernels)
    return out


def weighted_kid(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor, weights: torch.Tensor) -> float:
    """metrics.kid(paired=True) with each sample counted `weights` times (a bootstrap draw): every term is a mean
    over pairs of distinct draws, so all-ones weights give exactly the unweighted paired KID."""
    pairs = metrics.weighted_pairwise_mean
    return pairs(kxx, weights) + pairs(kyy, weights) - 2.0 * pairs(kxy, weights)


def metric_row(model: Measured, base: Measured, counts: Counts) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metric means under resample counts (all ones: the point estimate), and the per-prompt means."""
    row, per_prompt = model_row(ModelEvidence(model.per_sample, model.distances, math.nan), counts)
    if model.kernels is not None and base.kernels is not None:
        weights = (counts["prompts"][:, None] * counts["seeds"][None, :]).reshape(-1)
        row["kid"] = weighted_kid(model.kernels[0], base.kernels[0], model.kernels[1], weights)
    return row, per_prompt


@dataclass
class Oracle:
    """The exact optimum at each model's strength: base samples (eval.uncertainty.OracleEvidence, tilted by the
    anchor's reward), each model's beta (None: the base itself, the optimum at beta = inf), and the models whose
    oracle is unreliable (too few effective samples on some prompt): their oracle metrics are NaN."""

    evidence: OracleEvidence
    betas: dict[str, float | None]
    unreliable: set[str]


def add_oracle(rows: dict[str, dict[str, float]], per_prompt: dict[str, dict[str, torch.Tensor]], oracle: Oracle,
               counts: Counts) -> None:
    """'oracle_<metric>' (the optimum's value; metrics keyed by bare reward names) and 'kl_to_optimum' on every
    row, under these counts."""
    optimum, log_z = oracle_rows(oracle.evidence, counts)
    keys = [*oracle.evidence.per_sample, "path_kl", "diversity"]
    mp = counts["prompts"]
    for name, beta in oracle.betas.items():
        row = rows[name]
        if beta is None:  # the optimum at beta = inf is the base itself
            values, kl = {k: row[k] for k in keys}, 0.0
        elif name in oracle.unreliable:
            values, kl = {k: math.nan for k in keys}, math.nan
        else:
            values = {k: optimum[oracle_name(beta)][k] for k in keys}
            per = kl_to_optimum(per_prompt[name]["path_kl"], per_prompt[name][oracle.evidence.tilt_key], beta, log_z[beta])
            kl = float((per * mp).sum() / mp.sum())
        row.update({f"{ORACLE}{k}": v for k, v in values.items()} | {KL_TO_OPTIMUM: kl})


def with_deltas(rows: dict[str, dict[str, float]], base: str) -> dict[str, dict[str, float]]:
    """Every row gains '<metric>_delta' = its value minus the base's, computed on the same draw: paired, so the
    prompt-to-prompt spread that widens each metric's own interval cancels ("lose at most 0.05 fidelity")."""
    ref = rows[base]
    return {name: {**row, **{f"{k}{DELTA}": v - ref[k] for k, v in row.items() if k not in ("path_kl", "kid")}}
            for name, row in rows.items()}


Derived = Callable[[dict[str, dict[str, float]]], dict[str, float]]  # rows by model -> extra numbers


def intervals(models: dict[str, Measured], base: str, replicates: int, seed: int, confidence: float,
              derived: Derived = lambda rows: {}, progress: Callable[[], None] | None = None,
              oracle: Oracle | None = None) -> dict[str, Interval]:
    """'<model>/<metric>' for every model and metric, plus whatever `derived` computes from the rows of one
    replicate (an objective, a difference between models), each with its percentile interval. With an oracle,
    its base samples are resampled within each prompt too (as in the eval)."""
    first = next(iter(models.values())).distances

    def estimate(counts: Counts) -> dict[str, float]:
        measured = {name: metric_row(m, models[base], counts) for name, m in models.items()}
        rows = with_deltas({name: row for name, (row, _) in measured.items()}, base)
        if oracle is not None:
            add_oracle(rows, {name: pp for name, (_, pp) in measured.items()}, oracle, counts)
        flat = {f"{name}/{k}": v for name, row in rows.items() for k, v in row.items()}
        return {**flat, **derived(rows)}

    shapes = {"prompts": (first.shape[0],), "seeds": (first.shape[1],)}
    if oracle is not None:
        shapes["oracle"] = tuple(oracle.evidence.distances.shape[:2])
    return bootstrap(estimate, shapes, replicates, seed, confidence, progress)
