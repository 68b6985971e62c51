"""Turn sampled images into the comparison's numbers: per-model rows, per-sample rows, approximation errors."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from deradiff.eval import metrics
from deradiff.eval.generate import Job, VariantSamples
from deradiff.eval.plan import target_of
from deradiff.eval.variants import Variant
from deradiff.losses.dpo import per_sample_mse

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def reward_key(name: str) -> str:
    return f"reward_{name}"


def score_rewards(images: torch.Tensor, prompts: Sequence[str], rewards: dict[str, RewardFn], batch: int = 64) -> dict[str, torch.Tensor]:
    """Every configured reward per sample (rewards take images [B,3,H,W] in [0,1] and prompts)."""
    out = {}
    for name, fn in rewards.items():
        with torch.no_grad():
            parts = [fn(images[i : i + batch], list(prompts[i : i + batch])).detach().float().cpu().reshape(-1)
                     for i in range(0, len(images), batch)]
        out[reward_key(name)] = torch.cat(parts)
    return out


def classifier_features(classifier: torch.nn.Module) -> FeatureFn:
    """Pooled penultimate features of the tiny-world classifier (input of its first head), for KID."""
    head = next(iter(classifier.out.values()))

    def features(images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                classifier(images)
        finally:
            handle.remove()
        return captured[0].float().cpu()

    return features


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Downsampled raw pixels: a crude but model-free KID feature when no feature network applies."""
    return F.interpolate(images.float(), size=(16, 16), mode="area").flatten(1)


def standardized(features: dict[str, torch.Tensor], reference: str = "base") -> dict[str, torch.Tensor]:
    """Every set scaled by the base model's per-dimension mean/std (raw activations have wildly different scales).

    A dimension the base barely uses gets a tenth of a typical dimension's scale, not its ~0 std (docs/validation.md)."""
    ref = features[reference].double()
    if len(ref) > 1:
        spread = ref.std(0)
        mean, std = ref.mean(0), spread.clamp_min(max(0.1 * float(spread.mean()), 1e-6))
    else:
        mean, std = ref.mean(0), torch.ones(ref.shape[1], dtype=torch.float64)
    return {k: ((v.double() - mean) / std).float() for k, v in features.items()}


def variant_row(variant: Variant, samples: VariantSamples, per_sample: dict[str, torch.Tensor], prompts: Sequence[str]) -> dict[str, Any]:
    """Means of every per-sample metric plus within-prompt diversity and compute time for one model."""
    row: dict[str, Any] = {**variant.tracker_config(), "target": "", "n": int(samples.images.shape[0]),
                           "model_seconds": samples.seconds}
    row["effective_beta"] = variant.effective_beta
    for key, values in per_sample.items():
        row[key] = float(values.mean())
    row["path_kl"] = float(samples.path_kl.mean())
    row["diversity"] = metrics.within_prompt_diversity(samples.images, prompts)
    return row


def pair_metrics(samples: VariantSamples, other: VariantSamples, features: dict[str, torch.Tensor] | None, a: str, b: str) -> dict[str, float]:
    """Same-seed image distance (MSE/PSNR) and distribution distance (KID) between two models' samples."""
    mse = per_sample_mse(samples.images, other.images)
    psnr = metrics.psnr(samples.images, other.images)
    out = {"mse": float(mse.mean()), "psnr": float(psnr[torch.isfinite(psnr)].mean()) if torch.isfinite(psnr).any() else math.inf}
    paired = features is not None and len(features[a]) > 1
    out["kid"] = metrics.kid(features[a], features[b], paired=True) if paired else math.nan  # shared noise: paired
    return out


def score(
    variants: Sequence[Variant], samples: dict[str, VariantSamples], jobs: Sequence[Job],
    rewards: dict[str, RewardFn], feature_fn: FeatureFn | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per model, one row per sample). Pair metrics compare each model with base and its target."""
    prompts = [p for p, _ in jobs]
    features = standardized({v.name: feature_fn(samples[v.name].images) for v in variants}) if feature_fn else None
    rows, sample_rows = [], []
    for variant in variants:
        got = samples[variant.name]
        per_sample = score_rewards(got.images, prompts, rewards)
        row = variant_row(variant, got, per_sample, prompts)
        row.update({f"{k}_vs_base": v for k, v in pair_metrics(got, samples["base"], features, variant.name, "base").items()})
        target = target_of(variant, variants)
        if target is not None:
            row["target"] = target.name
            row.update({f"{k}_vs_target": v for k, v in pair_metrics(got, samples[target.name], features, variant.name, target.name).items()})
        rows.append(row)
        sample_rows.extend(_sample_rows(variant, jobs, got, per_sample))
    return rows, sample_rows


def _sample_rows(variant: Variant, jobs: Sequence[Job], got: VariantSamples, per_sample: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": variant.name, "kind": variant.kind, "prompt": prompt, "seed": seed, "path_kl": float(got.path_kl[i]),
         **{k: float(v[i]) for k, v in per_sample.items()}}
        for i, (prompt, seed) in enumerate(jobs)
    ]


def approximation_errors(rows: Sequence[dict[str, Any]], metric_keys: Sequence[str]) -> list[dict[str, Any]]:
    """|approx - retrained| / |retrained - base| per metric, for every realigned and weight-scaled model with a target."""
    by_name = {r["name"]: r for r in rows}
    base = by_name["base"]
    out = []
    for row in rows:
        if not row.get("target"):
            continue
        target = by_name[row["target"]]
        for key in metric_keys:
            out.append({"name": row["name"], "kind": row["kind"], "lambda": row["lambda"], "effective_beta": row["effective_beta"],
                        "target": row["target"], "metric": key, "value": row[key], "target_value": target[key],
                        "base_value": base[key], "normalized_error": metrics.normalized_error(row[key], target[key], base[key])})
    return out


def error_summary(errors: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean normalized error per kind (realigned vs weight_scaled) and metric: the headline comparison."""
    table: dict[str, dict[str, list[float]]] = {}
    for e in errors:
        if math.isfinite(e["normalized_error"]):
            table.setdefault(e["kind"], {}).setdefault(e["metric"], []).append(e["normalized_error"])
    return {kind: {m: sum(v) / len(v) for m, v in per.items()} for kind, per in table.items()}
