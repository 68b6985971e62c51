"""Eval logging: one tracker run per evaluated model (consistent config keys: kind, method, beta, lambda,
effective_beta), all in one W&B group per study, plus one 'report' run carrying the plots.

The group and job type go to each eval run explicitly (`default_factory(group, job_type)`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from deradiff.training.config import TrackerSection
from deradiff.training.tracking import Tracker, make_tracker

TrackerFactory = Callable[[TrackerSection, str, str], Tracker]  # (section, output_dir, run name) -> tracker


def default_factory(group: str, job_type: str) -> TrackerFactory:
    """W&B runs (or none, as `section` says) in `group`, of `job_type`."""

    def factory(section: TrackerSection, output_dir: str, name: str) -> Tracker:
        return make_tracker(dataclasses.replace(section, run_name=name), output_dir, is_main_process=True, group=group,
                            job_type=job_type)

    return factory


def numbers(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a results row (what a scalar log accepts)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def png_tensor(path: Path) -> torch.Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def log_eval(cfg: Any, variants: Sequence[Any], samples: dict[str, Any], jobs: Sequence[tuple[str, int]],
             results: dict[str, Any], out: Path, factory: TrackerFactory | None = None) -> None:
    """Log every model's metrics and sample images, then the report run with plots and the error summary."""
    if cfg.tracker.backend == "none" or cfg.tracker.mode == "disabled":
        return
    group = cfg.group or out.resolve().name
    factory = factory or default_factory(group, "eval")
    shown = min(len(jobs), cfg.grid_seeds)
    for variant, row in zip(variants, results["models"]):
        tracker = factory(cfg.tracker, str(out), f"eval-{variant.name}")
        tracker.log_config({**variant.tracker_config(), "beta0": results["meta"]["beta0"], "group": group})
        tracker.log_scalars(numbers(row), step=0)
        tracker.log_images("samples", samples[variant.name].images[:shown], [f"{p} (seed {s})" for p, s in jobs[:shown]], step=0)
        tracker.finish(numbers(row))
    for row in (r for r in results["models"] if r["kind"] == "oracle"):  # the exact optimum: numbers, no images
        tracker = factory(cfg.tracker, str(out), f"eval-{row['name']}")
        tracker.log_config({k: row[k] for k in ("name", "kind", "method", "beta", "lambda", "effective_beta", "reliable")}
                           | {"beta0": results["meta"]["beta0"], "group": group})
        tracker.log_scalars(numbers(row), step=0)
        tracker.finish(numbers(row))
    log_report(cfg, results, out, factory, group)


def log_report(cfg: Any, results: dict[str, Any], out: Path, factory: TrackerFactory, group: str) -> None:
    """The report run: kind=report, the plots as images and the mean approximation errors as scalars."""
    tracker = factory(cfg.tracker, str(out), "eval-report")
    tracker.log_config({"kind": "report", "method": results["meta"]["method"], "beta0": results["meta"]["beta0"], "group": group,
                        "verdict": results.get("verdict", [])})
    summary = {f"approx_error/{kind}/{m}": v for kind, per in results["error_summary"].items() for m, v in per.items()}
    for c in results.get("comparisons", []):  # realigned - weight-scaled normalized error, with its interval
        stem = f"error_difference/{c['reference']}/{c['scope']}/{c['metric']}"
        summary.update({stem: c["difference"], f"{stem}_lo": c["difference_lo"], f"{stem}_hi": c["difference_hi"]})
    tracker.log_scalars(numbers(summary), step=0)
    for rel in results["plots"]:
        tracker.log_images(f"plots/{Path(rel).stem}", png_tensor(out / rel)[None], [rel], step=0)
    tracker.finish(numbers(summary))
