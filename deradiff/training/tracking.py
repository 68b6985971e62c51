"""The tracker interface trainers log through: W&B (online/offline/disabled), nothing, or a recorder.

Trainers depend on the `Tracker` protocol only, so unit tests assert on a `RecordingTracker` instead of
parsing W&B's binary offline log, and W&B failing to start never kills a training run.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from deradiff.training.config import TrackerSection


@runtime_checkable
class Tracker(Protocol):
    """What a trainer may log. Implementations must be cheap no-ops where they do not apply."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...

    def log_images(self, key: str, images: torch.Tensor, captions: Sequence[str], step: int) -> None:
        """`images`: FloatTensor[B,3,H,W] in [0,1]."""
        ...

    def finish(self, summary: dict[str, Any] | None = None) -> None: ...


class NullTracker:
    """Logs nothing (tracker.backend=none, and every non-main process)."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def log_images(self, key: str, images: torch.Tensor, captions: Sequence[str], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        pass


@dataclass
class RecordingTracker:
    """Keeps every call in memory, for tests."""

    config: dict[str, Any] = field(default_factory=dict)
    scalars: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    images: list[tuple[int, str, torch.Tensor, list[str]]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    finished: bool = False

    def log_config(self, config: dict[str, Any]) -> None:
        self.config.update(config)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.scalars.append((step, dict(values)))

    def log_images(self, key: str, images: torch.Tensor, captions: Sequence[str], step: int) -> None:
        self.images.append((step, key, images.detach().cpu(), list(captions)))

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        self.summary = summary
        self.finished = True

    def series(self, key: str) -> list[float]:
        """All logged values of one scalar, in step order."""
        return [values[key] for _, values in self.scalars if key in values]


class WandbTracker:
    """Weights & Biases; `online` falls back to `offline` (with a warning) when W&B cannot start."""

    def __init__(self, section: TrackerSection, run_dir: str, default_name: str, group: str | None = None,
                 job_type: str | None = None) -> None:
        import wandb

        self._wandb = wandb
        kwargs = dict(
            group=group,  # None: W&B's own default (WANDB_RUN_GROUP when set)
            job_type=job_type,  # None: W&B's own default (WANDB_JOB_TYPE when set)
            project=section.project,
            entity=section.entity,
            name=section.run_name or default_name,
            tags=list(section.tags) or None,
            dir=run_dir,
            reinit="finish_previous",
        )
        os.makedirs(run_dir, exist_ok=True)
        try:
            self.run = wandb.init(mode=section.mode, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any W&B failure (auth, network) must not stop training
            if section.mode != "online":
                raise
            warnings.warn(f"W&B failed to start online ({type(exc).__name__}: {exc}); logging offline instead")
            self.run = wandb.init(mode="offline", **kwargs)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_images(self, key: str, images: torch.Tensor, captions: Sequence[str], step: int) -> None:
        arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        self.run.log({key: [self._wandb.Image(a, caption=c) for a, c in zip(arrays, captions)]}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        self.run.finish()


def make_tracker(section: TrackerSection, output_dir: str, is_main_process: bool, group: str | None = None,
                 job_type: str | None = None) -> Tracker:
    """The tracker for this process: only the main process logs anything. `group` and `job_type` are W&B's
    (runs of one study compare in one group; the job type says which stage logged a run)."""
    if not is_main_process or section.backend == "none" or section.mode == "disabled":
        return NullTracker()
    name = os.path.basename(os.path.abspath(output_dir))
    return WandbTracker(section, run_dir=output_dir, default_name=name, group=group, job_type=job_type)


RETIRED = "replaced"  # output_dir/wandb/replaced/: runs of results that were replaced, out of `wandb sync`'s globs


def retire_runs(output_dir: str | os.PathLike) -> list[Path]:
    """Move the W&B run folders of an earlier run of this output folder into wandb/replaced/, so that the
    README's `wandb sync <dir>/wandb/offline-run-*` uploads only the runs of the results now on disk.
    Kept, not deleted: they may be the only record of what was replaced."""
    root = Path(output_dir) / "wandb"
    runs = sorted(p for p in root.glob("*run-*") if p.is_dir() and not p.is_symlink()) if root.is_dir() else []
    for run in runs:
        target = root / RETIRED / run.name
        target.parent.mkdir(exist_ok=True)
        os.replace(run, target if not target.exists() else target.with_name(f"{run.name}-{os.getpid()}"))
    return runs
