"""Ground truth and uncertainty for one eval: the oracle's base samples (cached across runs), the evidence the
bootstrap resamples, and what they add to the results: oracle rows, an interval on every number, the
realigned-vs-weight-scaled comparisons, the gaps to the optimum and the verdict lines.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from deradiff.errors import DeradiffError
from deradiff.eval.config import EvalConfig, OracleSection, SamplingSection
from deradiff.eval.generate import Job, Loader, VariantSamples, make_jobs, sample_distributed
from deradiff.eval.metrics import pairwise_distances
from deradiff.eval.oracle import applicability, oracle_name, tilt
from deradiff.eval.plan import LoraInfo, target_of
from deradiff.eval.sampler import SampleSettings
from deradiff.eval.scoring import RewardFn, reward_key, score_rewards
from deradiff.eval.uncertainty import (Comparison, Evidence, Interval, ModelEvidence, OracleEvidence, bootstrap, count_shapes,
                                       estimate, verdict)
from deradiff.eval.variants import Variant
from deradiff.fileio import atomic_path, content_key

CACHE_VERSION = 1


@dataclass
class OraclePlan:
    """Whether the oracle applies (reason says why not), with which tilting reward."""

    reason: str | None
    reward: str | None


def oracle_plan(cfg: EvalConfig, anchor: LoraInfo, retrained: Sequence[LoraInfo]) -> OraclePlan:
    """Decide before any sampling; oracle.enabled=on turns 'does not apply' into an error."""
    if cfg.oracle.enabled == "off":
        return OraclePlan("no oracle: oracle.enabled is off", None)
    reason = oracle_reason(cfg.sampling, anchor, retrained)
    if reason is not None and cfg.oracle.enabled == "on":
        raise DeradiffError(f"oracle.enabled is on but {reason}")
    return OraclePlan(reason, None if reason else anchor.reward)


def oracle_reason(s: SamplingSection, anchor: LoraInfo, retrained: Sequence[LoraInfo]) -> str | None:
    """Why the oracle does not apply to these LoRAs sampled this way (None: it applies)."""
    reason = applicability(anchor, retrained, {"num_steps": s.steps, "eta": s.eta, "guidance_scale": s.guidance_scale})
    if reason is None and (s.height or s.width):
        reason = "no oracle: sampling.height/width differ from the training resolution"
    return reason


# ---- the oracle's base samples ---------------------------------------------------------------------------
def cache_root(section: OracleSection) -> Path:
    if section.cache_dir:
        return Path(section.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deradiff" / "oracle"


def base_fingerprint(base_model: str) -> list[Any]:
    """Names, sizes and mtimes of a local base model's files (a retrained base gets new samples); the id otherwise."""
    from deradiff.models.pipelines import resolve_base_model

    root = Path(resolve_base_model(base_model))
    if not root.is_dir():
        return [base_model]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def oracle_jobs(prompts: Sequence[str], section: OracleSection) -> list[Job]:
    return make_jobs(prompts, [section.seed_offset + i for i in range(section.samples_per_prompt)])


def cache_file(base_model: str, prompts: Sequence[str], settings: SampleSettings, section: OracleSection) -> Path:
    key = {"version": CACHE_VERSION, "base": base_fingerprint(base_model), "prompts": list(prompts),
           "sampler": [settings.steps, settings.eta, settings.guidance_scale, settings.height, settings.width],
           "n": section.samples_per_prompt, "seed_offset": section.seed_offset}
    return cache_root(section) / f"base-{content_key(key)}.safetensors"


def oracle_samples(base: Variant, base_model: str, prompts: Sequence[str], settings: SampleSettings, section: OracleSection,
                   batch_size: int, loader: Loader, device: str) -> tuple[torch.Tensor | None, Path, bool]:
    """(images of every base sample in job order, cache file, whether it came from the cache); None off main."""
    from safetensors.torch import save_file

    path = cache_file(base_model, prompts, settings, section)
    cached = read_cache(path, len(prompts) * section.samples_per_prompt) if path.is_file() else None
    if cached is not None:
        return cached, path, True
    samples = sample_distributed([base], base_model, oracle_jobs(prompts, section), settings, batch_size, loader, device,
                                 desc="oracle base samples")
    if samples is None:
        return None, path, False
    images = samples["base"].images.half()  # stored as float16 (~2^-11 pixel error); used as stored so a rerun
    with atomic_path(path) as tmp:           # from the cache gives the same numbers
        save_file({"images": images.contiguous()}, str(tmp))
    return images.float(), path, False


def read_cache(path: Path, count: int) -> torch.Tensor | None:
    """The cached base images, or None (with a note) when the file is damaged: unreadable, the wrong number of
    images, or non-finite values. It is a cache, so a damaged one is sampled again and replaced."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        images = load_file(str(path)).get("images")
    except (SafetensorError, OSError) as exc:
        images, why = None, f"unreadable: {exc}"
    else:
        why = "no images" if images is None else f"{len(images)} images, expected {count}"
    if images is not None and len(images) == count and bool(torch.isfinite(images).all()):
        return images.float()
    why = "non-finite values" if images is not None and len(images) == count else why
    print(f"note: oracle cache '{path}' is damaged ({why}); sampling it again")
    return None


# ---- evidence --------------------------------------------------------------------------------------------
def model_evidence(variants: Sequence[Variant], samples: dict[str, VariantSamples], jobs: Sequence[Job],
                   sample_rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, ModelEvidence]:
    """Per-sample metrics on the prompt x seed grid (jobs are prompt-major) and per-prompt pixel distances."""
    n_prompts = len(dict.fromkeys(p for p, _ in jobs))
    n_seeds = len(jobs) // n_prompts
    out = {}
    for v in variants:
        rows = [r for r in sample_rows if r["name"] == v.name]
        per_sample = {k: torch.tensor([r[k] for r in rows], dtype=torch.float64).view(n_prompts, n_seeds) for k in keys}
        images = samples[v.name].images.view(n_prompts, n_seeds, *samples[v.name].images.shape[1:])
        out[v.name] = ModelEvidence(per_sample, torch.stack([pairwise_distances(x) for x in images]), v.effective_beta)
    return out


def oracle_evidence(images: torch.Tensor, prompts: Sequence[str], rewards: dict[str, RewardFn], tilt_reward: str,
                    betas: Sequence[float]) -> OracleEvidence:
    n = len(images) // len(prompts)
    scores = score_rewards(images, [p for p in prompts for _ in range(n)], rewards)
    grid = images.view(len(prompts), n, *images.shape[1:])
    return OracleEvidence(list(betas), reward_key(tilt_reward), {k: v.double().view(len(prompts), n) for k, v in scores.items()},
                          torch.stack([pairwise_distances(x) for x in grid]))


def oracle_betas(variants: Sequence[Variant]) -> list[float]:
    """Every evaluated strength once: 0.08 / 0.8 is 0.09999999999999999 in floats and must meet retrained 0.1."""
    betas: list[float] = []
    for beta in sorted(v.effective_beta for v in variants if v.kind != "base"):
        if not betas or not math.isclose(beta, betas[-1], rel_tol=1e-9):
            betas.append(beta)
    return betas


def worst_ess(oracle: OracleEvidence, beta: float) -> float:
    rewards = oracle.per_sample[oracle.tilt_key]
    return min(tilt(r, beta).ess for r in rewards)


def comparisons(variants: Sequence[Variant], reliable: dict[float, bool]) -> list[Comparison]:
    """Each trained or approximate model with its retrained target and its (reliable) oracle."""
    out = []
    for v in variants:
        if v.kind == "base":
            continue
        target = target_of(v, variants)
        beta = next((b for b, ok in reliable.items() if ok and math.isclose(b, v.effective_beta, rel_tol=1e-6)), None)
        out.append(Comparison(v.name, v.kind, v.lam, target.name if target else None, oracle_name(beta) if beta else None))
    return out


def intervals(evidence: Evidence, replicates: int, seed: int, confidence: float) -> dict[str, Interval]:
    """Every number with its bootstrap interval (replicates = 0: bootstrap's point estimates with NaN bounds)."""
    bar = tqdm(total=replicates, desc="bootstrap", unit="resample", leave=False)
    try:
        return bootstrap(lambda c: estimate(evidence, c), count_shapes(evidence), replicates, seed, confidence, bar.update)
    finally:
        bar.close()


# ---- results ---------------------------------------------------------------------------------------------
def with_interval(row: dict[str, Any], key: str, iv: Interval | None, value: bool = False) -> None:
    if iv is None:
        return
    if value:
        row[key] = iv.value
    row[f"{key}_lo"], row[f"{key}_hi"] = iv.lo, iv.hi


def oracle_row(beta: float, method: str, keys: Sequence[str], ivs: dict[str, Interval], n: int, min_ess: float) -> dict[str, Any]:
    name = oracle_name(beta)
    ess = ivs[f"row/{name}/ess"].value
    row: dict[str, Any] = {"name": name, "kind": "oracle", "method": method, "beta": beta, "lambda": None,
                           "effective_beta": beta, "anchor": False, "target": "", "n": n, "ess": ess, "reliable": ess >= min_ess}
    for k in keys:
        with_interval(row, k, ivs.get(f"row/{name}/{k}"), value=True)
    return row


def add_validation(results: dict[str, Any], evidence: Evidence, ivs: dict[str, Interval], cfg: EvalConfig,
                   oracle_meta: dict[str, Any]) -> None:
    """Intervals on every row, oracle rows, comparisons, gaps to the optimum and the verdict lines."""
    keys = results["meta"]["metric_keys"]
    for row in results["models"]:
        for k in keys:
            with_interval(row, k, ivs.get(f"row/{row['name']}/{k}"))
        with_interval(row, "kl_to_optimum", ivs.get(f"row/{row['name']}/kl_to_optimum"), value=True)
    if evidence.oracle is not None:
        n = evidence.oracle.distances.shape[0] * evidence.oracle.distances.shape[1]
        results["models"] += [oracle_row(b, results["meta"]["method"], keys, ivs, n, cfg.oracle.min_ess) for b in evidence.oracle.betas]
    for e in results["approximation"]:
        e["reference"] = "retrained"
        with_interval(e, "normalized_error", ivs.get(f"err/retrained/{e['name']}/{e['metric']}"))
    results["oracle_gaps"] = oracle_gaps(evidence, keys, ivs)
    results["comparisons"] = comparison_rows(keys, ivs)
    results["meta"]["oracle"] = oracle_meta
    results["meta"]["bootstrap"] = {"replicates": cfg.bootstrap.replicates, "confidence": cfg.bootstrap.confidence,
                                    "seed": cfg.bootstrap.seed,
                                    "resampled": "prompts and seeds (paired: one draw shared by every model); "
                                                 "the oracle's base samples within each prompt"}
    results["verdict"] = verdict_lines(results, evidence, ivs, cfg)


def oracle_gaps(evidence: Evidence, keys: Sequence[str], ivs: dict[str, Interval]) -> list[dict[str, Any]]:
    """model - optimum at the model's effective beta, per metric, with intervals (interval incl. 0: consistent)."""
    out = []
    for c in (c for c in evidence.comparisons if c.oracle):
        for k in keys:
            gap = ivs.get(f"gap/oracle/{c.name}/{k}")
            if gap is None:
                continue
            row = {"name": c.name, "kind": c.kind, "oracle": c.oracle, "metric": k, "gap": gap.value,
                   "gap_lo": gap.lo, "gap_hi": gap.hi, "consistent_with_oracle": not gap.excludes_zero()}
            with_interval(row, "normalized_error", ivs.get(f"err/oracle/{c.name}/{k}"), value=True)
            out.append(row)
    return out


def comparison_rows(keys: Sequence[str], ivs: dict[str, Interval]) -> list[dict[str, Any]]:
    """Realigned minus weight-scaled normalized error, per lambda and averaged over lambdas, vs each reference."""
    out = []
    for name, diff in ivs.items():
        if not name.startswith("diff/"):
            continue
        _, reference, scope, metric = name.split("/", 3)
        row = {"reference": reference, "scope": scope, "metric": metric, "difference": diff.value,
               "difference_lo": diff.lo, "difference_hi": diff.hi, "verdict": verdict(diff, "realignment", "weight scaling")}
        out.append(row)
    order = {k: i for i, k in enumerate(keys)}
    return sorted(out, key=lambda r: (r["reference"], r["scope"] != "mean", r["scope"], order.get(r["metric"], 0)))


def fmt(iv: Interval, signed: bool = False) -> str:
    spec = "+.3g" if signed else ".3g"
    bounds = f" [{iv.lo:{spec}}, {iv.hi:{spec}}]" if math.isfinite(iv.lo) else " [no interval]"
    return f"{iv.value:{spec}}{bounds}"


def verdict_lines(results: dict[str, Any], evidence: Evidence, ivs: dict[str, Interval], cfg: EvalConfig) -> list[str]:
    """The report's opening lines, each read off an interval (no claim without one)."""
    meta, conf = results["meta"], f"{100 * cfg.bootstrap.confidence:g}%"
    lines = [f"Intervals: {conf} bootstrap over {meta['num_prompts']} prompts x {meta['num_seeds']} seeds "
             f"({cfg.bootstrap.replicates} paired resamples); a difference counts only when its interval excludes 0."]
    for reference in ("retrained", "oracle"):
        for k in meta["metric_keys"]:
            diff = ivs.get(f"diff/{reference}/mean/{k}")
            if diff is not None:
                lines.append(f"{k} vs {reference}: {verdict(diff, 'realignment', 'weight scaling')} "
                             f"(normalized error, realigned - weight-scaled, mean over lambdas: {fmt(diff, True)})")
            elif f"mean_err/{reference}/realigned/{k}" in ivs:
                lines.append(f"{k} vs {reference}: realigned normalized error {fmt(ivs[f'mean_err/{reference}/realigned/{k}'])}")
    lines += optimum_lines(results, evidence, ivs)
    return lines


def optimum_lines(results: dict[str, Any], evidence: Evidence, ivs: dict[str, Interval]) -> list[str]:
    """Is each retrained model at its optimum? And which oracle rows are too noisy to use."""
    oracle = results["meta"]["oracle"]
    if evidence.oracle is None:
        return [oracle["status"]]
    reward = evidence.oracle.tilt_key
    lines = [f"{r['name']}: unreliable (ESS {r['ess']:.0f} of {oracle['samples_per_prompt']} on its worst prompt, "
             f"below oracle.min_ess {oracle['min_ess']:g}); not used" for r in results["models"] if r["kind"] == "oracle" and not r["reliable"]]
    for c in evidence.comparisons:
        diff = ivs.get(f"closer/{c.name}")
        if diff is not None:
            lines.append(f"{c.name} vs {c.target}, KL to the optimum at beta {evidence.models[c.name].effective_beta:.3g}: "
                         f"{c.name} - {c.target} = {fmt(diff, True)} nats: {verdict(diff, c.name, c.target)}")
    for c in evidence.comparisons:
        if c.kind != "retrained" or not c.oracle:
            continue
        gaps = [ivs[f"gap/oracle/{c.name}/{k}"] for k in (reward, "path_kl")]
        at = all(not g.excludes_zero() for g in gaps)
        lines.append(f"{c.name} vs its optimum {c.oracle}: {reward} gap {fmt(gaps[0], True)}, path KL gap {fmt(gaps[1], True)} nats, "
                     f"KL to optimum {fmt(ivs[f'row/{c.name}/kl_to_optimum'])} nats: "
                     + ("consistent with its optimum" if at else "NOT at its optimum (a gap's interval excludes 0)"))
    return lines


def run_validation(cfg: EvalConfig, plan_: OraclePlan, variants: Sequence[Variant], samples: dict[str, VariantSamples],
                   jobs: Sequence[Job], prompts: Sequence[str], rewards: dict[str, RewardFn], results: dict[str, Any],
                   oracle_images: torch.Tensor | None, oracle_meta: dict[str, Any]) -> None:
    """Build the evidence, bootstrap it, and add everything to `results` (main process)."""
    keys = [k for k in results["meta"]["metric_keys"] if k != "diversity"]
    models = model_evidence(variants, samples, jobs, results["samples"], keys)
    oracle = None
    reliable: dict[float, bool] = {}
    if oracle_images is not None:
        betas = oracle_betas(variants)
        oracle = oracle_evidence(oracle_images, prompts, rewards, plan_.reward, betas)
        reliable = {b: worst_ess(oracle, b) >= cfg.oracle.min_ess for b in betas}
    evidence = Evidence(models, oracle, comparisons(variants, reliable), list(results["meta"]["metric_keys"]))
    ivs = intervals(evidence, cfg.bootstrap.replicates, cfg.bootstrap.seed, cfg.bootstrap.confidence)
    add_validation(results, evidence, ivs, cfg, oracle_meta)


def describe(plan_: OraclePlan, section: OracleSection, cache: Path | None = None, cached: bool = False) -> dict[str, Any]:
    """meta['oracle']: shown or why not, and how it was estimated."""
    info: dict[str, Any] = {"status": "shown" if plan_.reason is None else plan_.reason, "reward": plan_.reward,
                            "samples_per_prompt": section.samples_per_prompt, "min_ess": section.min_ess}
    if cache is not None:
        info.update({"cache": str(cache), "from_cache": cached})
    return info
