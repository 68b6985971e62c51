"""Resumable checkpoints: accelerate `save_state` (model, optimizer, scheduler, RNG) written atomically.

Layout: `output_dir/checkpoints/step-00000100/` holding accelerate's state files, `trainer_state.json`
(step counters) and `lora/` (the adapter at that step, loadable like the final one). Each is written to a
temp folder and renamed, so `latest` never points at a half-written checkpoint after a crash.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from accelerate import Accelerator

from deradiff.errors import DeradiffError
from deradiff.fileio import remove_dir, replace_dir

CHECKPOINTS = "checkpoints"
FINAL_LORA = "lora"  # the trained adapter, output_dir/lora
STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a trainer state), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """`None` → start fresh; `latest` → newest checkpoint or fresh if none; else the named folder (must exist)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_NAME).is_file():
        raise DeradiffError(f"resume_from '{resume_from}' is not a checkpoint folder (no {STATE_NAME} in it)")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    keep: int = 0,
) -> Path:
    """Collective: every process must call it (DeepSpeed shards optimizer state across ranks).

    All ranks write into the same temp folder; the main process renames it after a barrier.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        replace_dir(tmp, final)
        _prune(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from `path`; returns the saved trainer state.

    Model weights must be safetensors; accelerate reads the remaining small state files (optimizer,
    scheduler, RNG) with `torch.load(weights_only=True)`, which refuses pickled code. A file that fails to
    load is a one-line error naming the checkpoint, not a traceback.
    """
    _refuse_pickled_weights(path)
    try:
        accelerator.load_state(str(path))
        return json.loads((path / STATE_NAME).read_text())
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeradiffError(f"checkpoint '{path}' could not be loaded: {first}") from exc


def check_fresh_start(output_dir: str | os.PathLike, overwrite: bool, remove: bool = True) -> None:
    """A run that does not resume must not silently mix with another run's checkpoints and LoRA in the same
    folder (a later `resume_from=latest` would pick the old run's steps). Refuse, or clear them on request.
    Every process checks (so all of them stop together); only the one with `remove` deletes."""
    root = Path(output_dir)
    previous = [p for p in (root / CHECKPOINTS, root / FINAL_LORA) if p.exists()]
    if not previous:
        return
    if not overwrite:
        names = ", ".join(f"{p.name}/" for p in previous)
        raise DeradiffError(
            f"output_dir '{root}' already holds a training run ({names}); pass train.resume_from=latest to "
            "continue it, train.overwrite=true to start over, or another output_dir"
        )
    for path in previous if remove else []:
        remove_dir(path)


def _refuse_pickled_weights(path: Path) -> None:
    """Checkpoints written here hold model.safetensors; a pickled pytorch_model*.bin can run code when loaded."""
    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        raise DeradiffError(
            f"checkpoint '{path}' holds pickled model weights ({', '.join(pickled)}); deradiff resumes only from "
            "safetensors weights (model.safetensors) because pickles can run code when loaded"
        )


def _prune(output_dir: str | os.PathLike, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        remove_dir(old)
