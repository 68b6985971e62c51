"""Which models one evaluation compares: read the LoRAs' metadata, build the lambda grid and the variants."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from deradiff.errors import DeradiffError
from deradiff.eval.config import EvalConfig
from deradiff.eval.variants import Variant
from deradiff.models.pipelines import check_lora_dir, read_lora_metadata

REL_TOL = 1e-6


@dataclass(frozen=True)
class LoraInfo:
    """A trained LoRA as the eval needs it: where it is, its KL strength, how it was trained, on what base."""

    path: str
    beta: float
    method: str
    base_model: str | None
    beta_units: str | None = None  # 'reward': the objective is E[r] - beta * KL (an oracle exists)
    reward: str | None = None
    sampler: dict[str, float] | None = None  # the training sampler: num_steps, eta, guidance_scale


def read_lora(path: str, key: str) -> LoraInfo:
    """LoraInfo from a LoRA folder's deradiff metadata (beta is required: it places the model on the curve).
    The folder is checked first (missing, text-encoder layers, non-finite weights): the eval fails before sampling."""
    check_lora_dir(path, key)
    meta = read_lora_metadata(path)
    if meta is None or meta.get("beta") is None:
        raise DeradiffError(f"LoRA '{path}' has no deradiff metadata with a beta; eval needs each LoRA's KL strength")
    method = str(meta.get("method", "unknown"))
    # LoRAs from before beta_units was recorded: DDPO's beta always was in reward units.
    units = meta.get("beta_units") or ("reward" if method == "ddpo" else None)
    return LoraInfo(path=str(path), beta=float(meta["beta"]), method=method, base_model=meta.get("base_model"),
                    beta_units=units, reward=meta.get("reward"), sampler=meta.get("sampler"))


def default_lambdas(beta0: float, betas: Sequence[float], extra: Sequence[float]) -> list[float]:
    """beta0/beta for each retrained beta (so each has a realigned twin) plus the extra (lambda > 1) points."""
    values = [beta0 / b for b in betas] + list(extra)
    return sorted({round(v, 12) for v in values if not math.isclose(v, 1.0, rel_tol=REL_TOL)})


def plan_variants(anchor: LoraInfo, retrained: Sequence[LoraInfo], lambdas: Sequence[float], weight_scaled: bool) -> list[Variant]:
    """base, the anchor and every retrained LoRA, then realigned (and weight-scaled) anchor at each lambda.

    lambda = 1 is skipped (it is the anchor itself) and so is lambda = 0 (the base itself).
    """
    variants = [Variant("base", "base", anchor.path, anchor.method, None)]
    variants.append(Variant(f"retrained-b{anchor.beta:g}", "retrained", anchor.path, anchor.method, anchor.beta, anchor=True))
    for info in sorted(retrained, key=lambda r: r.beta):
        variants.append(Variant(f"retrained-b{info.beta:g}", "retrained", info.path, info.method, info.beta))
    for lam in (lam for lam in lambdas if lam > 0 and not math.isclose(lam, 1.0, rel_tol=REL_TOL)):
        variants.append(Variant(f"realigned-l{lam:g}", "realigned", anchor.path, anchor.method, anchor.beta, lam))
        if weight_scaled:
            variants.append(Variant(f"weight_scaled-l{lam:g}", "weight_scaled", anchor.path, anchor.method, anchor.beta, lam))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise DeradiffError(f"two evaluated models share a name (duplicate betas or lambdas?): {names}")
    return variants


def target_of(variant: Variant, variants: Sequence[Variant]) -> Variant | None:
    """The retrained model at the variant's effective beta (what realignment tries to reproduce), if any."""
    if variant.kind not in ("realigned", "weight_scaled"):
        return None
    for other in variants:
        if other.kind == "retrained" and math.isclose(other.effective_beta, variant.effective_beta, rel_tol=REL_TOL):
            return other
    return None


def plan(cfg: EvalConfig) -> tuple[LoraInfo, list[LoraInfo], list[Variant]]:
    """The anchor, the retrained LoRAs and the full list of variants for a config (each LoRA read and checked
    once here: the check scans every weight)."""
    anchor = read_lora(cfg.anchor_lora, "anchor_lora")
    retrained = [read_lora(p, f"retrained_loras[{i}]") for i, p in enumerate(cfg.retrained_loras)]
    check_same_scale(anchor, retrained)
    lambdas = cfg.lambdas if cfg.lambdas is not None else default_lambdas(anchor.beta, [r.beta for r in retrained], cfg.extra_lambdas)
    return anchor, retrained, plan_variants(anchor, retrained, lambdas, cfg.weight_scaled)


def check_same_scale(anchor: LoraInfo, retrained: Sequence[LoraInfo]) -> None:
    """lambda = beta0 / beta compares models only when both betas are on one scale: the same units (reward vs
    DPO's implicit reward) and, in reward units, the same reward. Unknown fields (older LoRAs) are not judged."""
    for i, other in enumerate(retrained):
        for field in ("beta_units", "reward"):
            mine, theirs = getattr(anchor, field), getattr(other, field)
            if mine is not None and theirs is not None and mine != theirs:
                raise DeradiffError(
                    f"config key 'retrained_loras[{i}]': LoRA '{other.path}' has {field} '{theirs}' but the anchor has "
                    f"'{mine}'; their betas are on different scales, so lambda = beta0 / beta would compare unlike models")
