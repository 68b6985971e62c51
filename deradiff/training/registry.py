"""Trainer name → (config schema, run function), so `deradiff train <name>` needs no edit per method.

A method registers itself at import of its module (its config schema lives with every trainer's in
`deradiff/training/config.py`)::

    # deradiff/training/ddpo.py
    from deradiff.training.config import DDPOConfig
    from deradiff.training.registry import TrainerSpec, register_trainer
    register_trainer(TrainerSpec("ddpo", DDPOConfig, run_ddpo, "configs/tiny/ddpo.yaml", "KL-regularized DDPO"))

and lists its module in `TRAINER_MODULES` below (a module not written yet is skipped). `run(config,
group=, job_type=)` returns the summary dict; the W&B group and job type go to its `Trainer` (None: the
Trainer's defaults). Keep module-level imports light (torch/diffusers inside `run` where possible)
so `deradiff --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

TRAINER_MODULES = ("deradiff.training.dpo", "deradiff.training.ddpo", "deradiff.training.reward_grad")


class RunFn(Protocol):
    """A method's run function: `run_ddpo(cfg, tracker=None, group=None, job_type=None)`."""

    def __call__(self, cfg: Any, tracker: Any = None, group: str | None = None,
                 job_type: str | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrainerSpec:
    name: str
    schema: type
    run: RunFn
    default_config: str | None
    help: str


_TRAINERS: dict[str, TrainerSpec] = {}


def register_trainer(spec: TrainerSpec) -> None:
    _TRAINERS[spec.name] = spec


def trainers() -> dict[str, TrainerSpec]:
    """All registered trainers, importing the known trainer modules first."""
    for module in TRAINER_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return dict(_TRAINERS)


def trainer(name: str) -> TrainerSpec:
    """One registered trainer by name; an unknown name is a one-line error listing the known ones."""
    found = trainers()
    if name not in found:
        from deradiff.errors import DeradiffError

        raise DeradiffError(f"no trainer '{name}' (known: {', '.join(sorted(found))})")
    return found[name]
