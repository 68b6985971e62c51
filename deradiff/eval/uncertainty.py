"""Bootstrap intervals for every number of an eval, and the verdict rule that reads them.

One estimator, `estimate(evidence, counts)`, turns resample counts into every reported number (model metrics,
oracle metrics, approximation errors and their differences); the point estimate is the same function with
every count 1. The resample is paired and two-way: prompts and seeds are drawn with replacement once per
replicate and shared by every model (the models saw the same noise per seed, so their errors are correlated
and must be compared on the same draw); the oracle's base samples are redrawn within each prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from deradiff.eval.metrics import normalized_error, weighted_pairwise_mean
from deradiff.eval.oracle import kl_to_optimum, oracle_name, tilt

Counts = dict[str, torch.Tensor]  # 'prompts' [P], 'seeds' [S], 'oracle' [P, N]: how often each was drawn


@dataclass
class ModelEvidence:
    """One model's per-sample numbers on the (prompt, seed) grid: metric -> [P, S], pixel distances [P, S, S]."""

    per_sample: dict[str, torch.Tensor]
    distances: torch.Tensor
    effective_beta: float


@dataclass
class OracleEvidence:
    """Base samples drawn with the training sampler: reward keys -> [P, N], distances [P, N, N]."""

    betas: list[float]
    tilt_key: str
    per_sample: dict[str, torch.Tensor]
    distances: torch.Tensor


@dataclass
class Comparison:
    """Which rows are compared: every approximate model with its retrained target and its oracle (names)."""

    name: str
    kind: str
    lam: float | None
    target: str | None
    oracle: str | None


@dataclass
class Evidence:
    models: dict[str, ModelEvidence]
    oracle: OracleEvidence | None
    comparisons: list[Comparison]
    metric_keys: list[str]


def count_shapes(evidence: Evidence) -> dict[str, tuple[int, ...]]:
    """What the bootstrap resamples: prompts, seeds, and (with an oracle) base samples within each prompt."""
    first = next(iter(evidence.models.values())).distances
    shapes = {"prompts": (first.shape[0],), "seeds": (first.shape[1],)}
    if evidence.oracle is not None:
        shapes["oracle"] = tuple(evidence.oracle.distances.shape[:2])
    return shapes


# ---- the estimator ---------------------------------------------------------------------------------------
def model_row(model: ModelEvidence, counts: Counts) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Count-weighted metric means (over prompts and seeds) and diversity; also the per-prompt means."""
    ms, mp = counts["seeds"], counts["prompts"]
    per_prompt = {k: (v.double() * ms).sum(1) / ms.sum() for k, v in model.per_sample.items()}
    row = {k: float((v * mp).sum() / mp.sum()) for k, v in per_prompt.items()}
    diversity = torch.tensor([weighted_pairwise_mean(d, ms) for d in model.distances], dtype=torch.float64)
    row["diversity"] = float((diversity * mp).sum() / mp.sum())
    return row, per_prompt


def oracle_rows(oracle: OracleEvidence, counts: Counts) -> tuple[dict[str, dict[str, float]], dict[float, torch.Tensor]]:
    """The optimum's metrics at every beta (prompt-weighted means of per-prompt tilts), and log Z per prompt."""
    mp = counts["prompts"]
    rows, log_z = {}, {}
    for beta in oracle.betas:
        tilts = [tilt(oracle.per_sample[oracle.tilt_key][p], beta, {k: v[p] for k, v in oracle.per_sample.items()},
                      oracle.distances[p], counts["oracle"][p]) for p in range(len(mp))]
        row = {k: _prompt_mean([t.means[k] for t in tilts], mp) for k in tilts[0].means}
        row["path_kl"] = _prompt_mean([t.kl for t in tilts], mp)
        row["ess"] = min(t.ess for t in tilts)
        rows[oracle_name(beta)] = row
        log_z[beta] = torch.tensor([t.log_z for t in tilts], dtype=torch.float64)
    return rows, log_z


def _prompt_mean(values: list[float], prompt_counts: torch.Tensor) -> float:
    return float((torch.tensor(values, dtype=torch.float64) * prompt_counts).sum() / prompt_counts.sum())


def estimate(evidence: Evidence, counts: Counts) -> dict[str, float]:
    """Every reported number under these counts, flat: 'row/<name>/<metric>', 'err/...', 'diff/...', 'gap/...'."""
    out: dict[str, float] = {}
    rows, per_prompt = {}, {}
    for name, model in evidence.models.items():
        rows[name], per_prompt[name] = model_row(model, counts)
    log_z: dict[float, torch.Tensor] = {}
    if evidence.oracle is not None:
        oracle, log_z = oracle_rows(evidence.oracle, counts)
        rows.update(oracle)
        _kl_to_optimum(evidence, counts, rows, per_prompt, log_z)
    for name, row in rows.items():
        out.update({f"row/{name}/{k}": v for k, v in row.items()})
    out.update(_errors(evidence, rows))
    return out


def _kl_to_optimum(evidence: Evidence, counts: Counts, rows: dict[str, dict[str, float]],
                   per_prompt: dict[str, dict[str, torch.Tensor]], log_z: dict[float, torch.Tensor]) -> None:
    """KL(model || optimum at its effective beta), per prompt then averaged, for models with a reliable oracle."""
    mp, key = counts["prompts"], evidence.oracle.tilt_key
    for c in (c for c in evidence.comparisons if c.oracle):
        beta = next(b for b in log_z if oracle_name(b) == c.oracle)
        kl = kl_to_optimum(per_prompt[c.name]["path_kl"], per_prompt[c.name][key], beta, log_z[beta])
        rows[c.name]["kl_to_optimum"] = float((kl * mp).sum() / mp.sum())


def _errors(evidence: Evidence, rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Normalized errors |model - reference| / |reference - base| vs the retrained target and vs the oracle,
    realigned-minus-weight-scaled differences per lambda, their means over lambdas, and raw gaps to the oracle."""
    out: dict[str, float] = {}
    base = rows["base"]
    errors: dict[tuple[str, str, str], list[float]] = {}  # (reference, kind, metric) -> errors over lambdas
    by_lambda: dict[tuple[str, float, str], dict[str, float]] = {}
    for c in evidence.comparisons:
        for ref_kind, ref in (("retrained", c.target), ("oracle", c.oracle)):
            if ref is None or ref not in rows:
                continue
            for m in evidence.metric_keys:
                err = normalized_error(rows[c.name][m], rows[ref][m], base[m])
                out[f"err/{ref_kind}/{c.name}/{m}"] = err
                out[f"gap/{ref_kind}/{c.name}/{m}"] = rows[c.name][m] - rows[ref][m]
                if c.kind in ("realigned", "weight_scaled") and math.isfinite(err):
                    errors.setdefault((ref_kind, c.kind, m), []).append(err)
                    by_lambda.setdefault((ref_kind, c.lam, m), {})[c.kind] = err
    for c in evidence.comparisons:  # which is nearer the optimum: the approximation or the retrained model?
        if c.target and "kl_to_optimum" in rows[c.name] and "kl_to_optimum" in rows.get(c.target, {}):
            out[f"closer/{c.name}"] = rows[c.name]["kl_to_optimum"] - rows[c.target]["kl_to_optimum"]
    for (ref_kind, lam, m), pair in by_lambda.items():
        if len(pair) == 2:
            out[f"diff/{ref_kind}/l{lam:g}/{m}"] = pair["realigned"] - pair["weight_scaled"]
    for (ref_kind, kind, m), values in errors.items():
        out[f"mean_err/{ref_kind}/{kind}/{m}"] = sum(values) / len(values)
    for ref_kind in ("retrained", "oracle"):
        for m in evidence.metric_keys:
            a, b = out.get(f"mean_err/{ref_kind}/realigned/{m}"), out.get(f"mean_err/{ref_kind}/weight_scaled/{m}")
            if a is not None and b is not None:
                out[f"diff/{ref_kind}/mean/{m}"] = a - b
    return out


# ---- the bootstrap ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    value: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


def resample_counts(n: int, generator: torch.Generator) -> torch.Tensor:
    """How often each of n items is drawn in n draws with replacement."""
    return torch.bincount(torch.randint(n, (n,), generator=generator), minlength=n).double()


def draw_counts(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> Counts:
    """One resample: shape (n,) draws n of n items; shape (p, n) does so within each of p groups."""
    counts = {}
    for key, shape in shapes.items():
        n = shape[-1]
        rows = [resample_counts(n, generator) for _ in range(shape[0] if len(shape) == 2 else 1)]
        counts[key] = torch.stack(rows) if len(shape) == 2 else rows[0]
    return counts


def bootstrap(estimator: Callable[[Counts], dict[str, float]], shapes: dict[str, tuple[int, ...]], replicates: int,
              seed: int, confidence: float = 0.95, progress: Callable[[], None] | None = None) -> dict[str, Interval]:
    """Point estimate (every count 1) and percentile interval of every number `estimator` returns.

    Deterministic in `seed`. A number a replicate cannot form (e.g. a normalized error whose denominator
    vanished) is NaN there and left out of its quantiles; with no finite replicate the interval is (nan, nan).
    """
    point = estimator({k: torch.ones(s, dtype=torch.float64) for k, s in shapes.items()})
    generator = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(replicates):
        values = estimator(draw_counts(shapes, generator))
        for k in point:
            draws[k].append(values.get(k, math.nan))
        if progress is not None:
            progress()
    alpha = (1 - confidence) / 2
    out = {}
    for k, v in point.items():
        sample = torch.tensor(draws[k], dtype=torch.float64)
        sample = sample[torch.isfinite(sample)]
        lo, hi = (float(torch.quantile(sample, alpha)), float(torch.quantile(sample, 1 - alpha))) if len(sample) else (math.nan, math.nan)
        out[k] = Interval(v, lo, hi)
    return out


def verdict(diff: Interval, better: str, worse: str) -> str:
    """'<better> is closer' only when the difference's interval excludes 0; otherwise 'indistinguishable'.

    `diff` is error(better) - error(worse): negative means `better` really is closer.
    """
    if not (math.isfinite(diff.lo) and math.isfinite(diff.hi)) or not diff.excludes_zero():
        return "indistinguishable"
    return f"{better} is closer" if diff.hi < 0 else f"{worse} is closer"
