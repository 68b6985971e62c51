"""The tune's W&B run: in the anchor's training group, one logged step per lambda (plot any metric against
`lambda` in W&B), the figures and grids as images, and the choice and cost in the run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deradiff.eval.plan import LoraInfo
from deradiff.eval.tracking import TrackerFactory, default_factory, numbers, png_tensor
from deradiff.tuning.config import TuneConfig


def tune_group(cfg: TuneConfig, anchor: LoraInfo) -> str:
    """The config's group, else the group the anchor's training logged to (its metadata), else tune-<folder>."""
    from deradiff.models.pipelines import read_lora_metadata

    recorded = (read_lora_metadata(anchor.path) or {}).get("wandb_group")
    return cfg.group or recorded or f"tune-{Path(cfg.output_dir).resolve().name}"


def summary_of(results: dict[str, Any]) -> dict[str, float]:
    """The run summary: the chosen lambda and beta, and the cost figures."""
    choice = results["choice"] or {}
    flat = {"chosen_lambda": choice.get("lambda"), "chosen_beta": choice.get("beta"),
            **{f"cost/{k}": v for k, v in results["cost"].items()}}
    return numbers({k: v for k, v in flat.items() if v is not None})


def log_tune(cfg: TuneConfig, anchor: LoraInfo, results: dict[str, Any], out: Path,
             factory: TrackerFactory | None = None) -> None:
    if cfg.tracker.backend == "none" or cfg.tracker.mode == "disabled":
        return
    group = tune_group(cfg, anchor)
    tracker = (factory or default_factory(group, "tune"))(cfg.tracker, str(out), "tune")
    meta = results["meta"]
    tracker.log_config({"kind": "tune", "method": meta["method"], "beta0": meta["beta0"], "group": group,
                        "criterion": meta["criterion"]["text"], "anchor_lora": meta["anchor_lora"],
                        "reason": results["choice"]["reason"] if results["choice"] else results["infeasible"]["message"]})
    for step, row in enumerate(results["rows"]):  # step i = the i-th smallest lambda
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.log_scalars(numbers({**values, "feasible": float(row["feasible"])}), step=step)
    last = len(results["rows"])
    for rel in results["plots"]:
        tracker.log_images(f"plots/{Path(rel).stem}", png_tensor(out / rel)[None], [rel], step=last)
    for grid in results["grids"]:
        if (out / grid["path"]).is_file():
            tracker.log_images("grids", png_tensor(out / grid["path"])[None], [grid["prompt"]], step=last)
    tracker.finish(summary_of(results))

