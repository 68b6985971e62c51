"""`deradiff eval`: sample base, anchor, retrained, realigned and weight-scaled models with shared noise; score,
compare, plot and report. `run_eval(cfg)` is the one entry (the CLI and the study call it).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from deradiff.config import config_to_dict
from deradiff.errors import DeradiffError
from deradiff.fileio import atomic_path, check_output_dir, check_results_absent, remove_outputs
from deradiff.eval import report, validation
from deradiff.eval.config import EvalConfig, SamplingSection
from deradiff.eval.generate import Job, Loader, VariantSamples, load_lora_pipeline, make_jobs, process_state, sample_distributed
from deradiff.eval.plan import plan
from deradiff.eval.sampler import SampleSettings
from deradiff.eval.scoring import FeatureFn, RewardFn, approximation_errors, classifier_features, error_summary, pixel_features, reward_key, score
from deradiff.eval.tracking import log_eval
from deradiff.eval.variants import Variant
from deradiff.lock import OutputDirLock
from deradiff.training.tracking import retire_runs

RESULTS = "results.json"
# What an eval writes into output_dir, results.json first: it marks a finished eval.
OUTPUTS = (RESULTS, "results.csv", "approximation.csv", "samples.csv", "report.html", "samples.safetensors", "plots", "grids")
NOTES = ("LPIPS is not computed (no LPIPS weights offline); KID uses {features} features "
         "(no Inception weights offline); path KL is summed over all DDIM steps (eta = {eta:g}).")


@dataclass
class EvalResult:
    """What a finished eval hands back: the report path and the full results dict (as in results.json)."""

    report: Path
    results: dict[str, Any]
    seconds: float


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def eval_prompts(cfg: EvalConfig) -> list[str]:
    if cfg.prompts is not None:
        return list(cfg.prompts)
    from deradiff.world import load_prompts

    return list(load_prompts("eval"))[: cfg.num_prompts]


def reward_fns(names: Sequence[str], options: dict[str, dict] | None = None) -> dict[str, RewardFn]:
    from deradiff.rewards import get_reward

    options = options or {}
    return {name: get_reward(name, **options.get(name, {})) for name in names}


def scored_rewards(cfg: EvalConfig, oracle: validation.OraclePlan) -> list[str]:
    """The configured rewards, plus the oracle's tilting reward (the anchor's training reward) when missing."""
    extra = [oracle.reward] if oracle.reward is not None and oracle.reward not in cfg.rewards else []
    return [*cfg.rewards, *extra]


def feature_fn(kind: str) -> FeatureFn | None:
    if kind == "none":
        return None
    if kind == "pixels":
        return pixel_features
    from deradiff.world.classifier import load_classifier

    return classifier_features(load_classifier())


def settings_of(s: SamplingSection) -> SampleSettings:
    """How every model is sampled, from a config's sampling section."""
    return SampleSettings(steps=s.steps, eta=s.eta, guidance_scale=s.guidance_scale, height=s.height, width=s.width,
                          branches=s.branches)


def run_eval(cfg: EvalConfig, loader: Loader = load_lora_pipeline, rewards: dict[str, RewardFn] | None = None,
             features: FeatureFn | None | str = "config", tracker_factory: Any = None) -> EvalResult | None:
    """Run the whole comparison; returns the result on the main process (None on the others)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    main = process_state().is_main_process
    check_output_dir(cfg.output_dir)
    with OutputDirLock(cfg.output_dir) if main else contextlib.nullcontext():
        return _run_eval(cfg, loader, rewards, features, tracker_factory)


def _run_eval(cfg: EvalConfig, loader: Loader, rewards: dict[str, RewardFn] | None, features: FeatureFn | None | str,
              tracker_factory: Any) -> EvalResult | None:
    """run_eval while holding the output folder's lock (main process)."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    check_results_absent(out, (RESULTS,), cfg.overwrite)  # an eval can take hours on real models
    prompts, device = eval_prompts(cfg), resolve_device(cfg.device)
    anchor, retrained, variants = plan(cfg)
    base_model = cfg.base_model or anchor.base_model
    if not base_model:
        raise DeradiffError("no base model: set base_model, or train the anchor with deradiff (metadata base_model)")
    oracle = validation.oracle_plan(cfg, anchor, retrained)
    # Rewards and features are built before sampling so missing weights fail in seconds, not after it.
    rewards = reward_fns(scored_rewards(cfg, oracle), cfg.reward_options) if rewards is None else rewards
    if oracle.reward is not None and oracle.reward not in rewards:
        raise DeradiffError(f"the oracle tilts by the anchor's reward '{oracle.reward}', which is not among the scored rewards")
    features = feature_fn(cfg.kid_features) if features == "config" else features
    jobs = make_jobs(prompts, cfg.seeds)
    samples = sample_distributed(variants, base_model, jobs, settings_of(cfg.sampling), cfg.sampling.batch_size, loader, device)
    oracle_images, oracle_meta = None, validation.describe(oracle, cfg.oracle)
    if oracle.reason is None:
        oracle_images, cache, cached = validation.oracle_samples(variants[0], base_model, prompts, settings_of(cfg.sampling), cfg.oracle,
                                                                 cfg.sampling.batch_size, loader, device)
        oracle_meta = validation.describe(oracle, cfg.oracle, cache, cached)
    if not process_state().is_main_process:
        return None
    results = build_results(cfg, anchor, base_model, variants, samples, jobs, rewards, features)
    validation.run_validation(cfg, oracle, variants, samples, jobs, prompts, rewards, results, oracle_images, oracle_meta)
    path = write_outputs(out, cfg, variants, samples, jobs, results)
    retire_runs(out)  # the previous eval's W&B runs describe results that were just replaced
    log_eval(cfg, variants, samples, jobs, results, out, tracker_factory)
    return EvalResult(report=path, results=results, seconds=time.perf_counter() - start)


def build_results(cfg: EvalConfig, anchor: Any, base_model: str, variants: Sequence[Variant], samples: dict[str, VariantSamples],
                  jobs: Sequence[Job], rewards: dict[str, RewardFn], features: FeatureFn | None) -> dict[str, Any]:
    """All numbers of the run in one dict (the content of results.json)."""
    rows, sample_rows = score(variants, samples, jobs, rewards, features)
    metric_keys = [reward_key(r) for r in rewards] + ["path_kl", "diversity"]
    errors = approximation_errors(rows, metric_keys)
    meta = {"anchor_lora": anchor.path, "beta0": anchor.beta, "method": anchor.method, "base_model": base_model,
            "num_prompts": len(dict.fromkeys(p for p, _ in jobs)), "num_seeds": len(cfg.seeds), "metric_keys": metric_keys,
            "notes": NOTES.format(features=cfg.kid_features if features is not None else "no", eta=cfg.sampling.eta),
            "config": config_to_dict(cfg)}
    return {"meta": meta, "models": rows, "approximation": errors, "error_summary": error_summary(errors),
            "samples": sample_rows, "plots": [], "grids": []}


def write_outputs(out: Path, cfg: EvalConfig, variants: Sequence[Variant], samples: dict[str, VariantSamples],
                  jobs: Sequence[Job], results: dict[str, Any]) -> Path:
    """Results first (the numbers survive whatever happens to a figure), then plots, grids, samples, the
    results again with the figure paths, and the HTML report, under `out`."""
    remove_outputs(out, OUTPUTS)  # an overwrite leaves no grid, plot or sample file of the earlier eval
    report.write_results(out, results)
    for sub in ("plots", "grids"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rewards = [k for k in results["meta"]["metric_keys"] if k.startswith("reward_")]
    results["plots"], results["skipped_plots"] = report.write_plots(out, results["models"], results["meta"]["metric_keys"],
                                                                    rewards[0] if rewards else None)
    results["grids"] = report.write_grids(out, samples, [v.name for v in variants], jobs, cfg.grid_prompts, cfg.grid_seeds)
    if cfg.save_samples:
        save_samples(out / "samples.safetensors", samples)
    report.write_results(out, results)
    return report.write_html(out, results)


def save_samples(path: Path, samples: dict[str, VariantSamples]) -> None:
    """Every image (uint8) and path KL, keyed '<model>/images' and '<model>/path_kl' (safetensors)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, s in samples.items():
        tensors[f"{name}/images"] = (s.images.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        tensors[f"{name}/path_kl"] = s.path_kl.float().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
