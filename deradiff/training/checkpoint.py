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
from deradiff.fileio import check_results_absent, read_json, remove_dir, replace_dir

CHECKPOINTS = "checkpoints"
FINAL_LORA = "lora"  # the trained adapter, output_dir/lora
TRAIN_CONFIG = "train_config.yaml"  # the run's resolved config, beside the adapter (tune's verify retrains with it)
STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Config keys that cannot change the trained weights: where and how often to log, save and resume, and caches.
# Everything else (data, model, LoRA, optimizer, loss, seeds, batch shape, precision) must match to resume.
NOT_WEIGHTS = frozenset({
    "output_dir", "tracker", "data.cache_dir", "data.generate_if_missing", "ddpo.log_images",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.resume_from", "train.overwrite",
})
# Schedules whose learning rate at a step depends on max_steps: extending such a run is not the same training.
_LR_DEPENDS_ON_LENGTH = ("linear", "cosine")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys users write as overrides."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def weight_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys that determine the trained weights (all but NOT_WEIGHTS), JSON-normalized."""
    flat = json.loads(json.dumps(flatten(config), default=str))
    return {k: v for k, v in flat.items() if k not in NOT_WEIGHTS and not any(k.startswith(f"{n}.") for n in NOT_WEIGHTS)}


def settings_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every weight setting that differs. A longer run may continue a shorter one
    (max_steps) unless the learning-rate schedule depends on the run's length."""
    ignore = set() if current.get("optim.lr_scheduler") in _LR_DEPENDS_ON_LENGTH else {"train.max_steps"}
    keys = sorted((set(saved) | set(current)) - ignore)
    missing = "(not set)"
    return [f"{k}: {saved.get(k, missing)} -> {current.get(k, missing)}" for k in keys if saved.get(k, missing) != current.get(k, missing)]


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


def check_resume(output_dir: str | os.PathLike, train: Any, config: dict[str, Any],
                 inputs: dict[str, str] | None = None) -> tuple[Path | None, str | None]:
    """(checkpoint to continue or None, why an earlier run will be discarded or None) for a trainer config
    (`train`: its TrainSection, `config`: the whole config as a dict, `inputs`: fingerprints of its inputs
    once loaded, e.g. the data's, compared where the checkpoint recorded them). Raises when the config asks to continue
    a run it does not describe, or to start over a run without `train.overwrite`. No side effects, so it runs
    before any loading (a refused run fails in seconds) and again under the output lock."""
    if train.resume_from is None:
        check_fresh_start(output_dir, train.overwrite, remove=False)
        return None, None
    path = resolve_resume(output_dir, train.resume_from)
    problem = resume_problem(path, train.max_steps, weight_settings(config), inputs or {}) if path else None
    if problem and not train.overwrite:
        raise DeradiffError(f"{problem}; pass train.overwrite=true to discard it and start fresh, or use another output_dir")
    return (None, problem) if problem else (path, None)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, checked for the fields resume reads."""
    state = read_json(path / STATE_NAME, "checkpoint state")
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and not isinstance(state["step"], bool)):
        raise DeradiffError(f"checkpoint state '{path / STATE_NAME}' is damaged (no integer step); resume from an "
                            "earlier checkpoint, or train.overwrite=true")
    return state


def resume_problem(path: Path, max_steps: int, settings: dict[str, Any], inputs: dict[str, str]) -> str | None:
    """Why continuing checkpoint `path` would not be the training `settings` and `inputs` describe (None when
    it would). Inputs catch what a config cannot: a data file replaced under the same path."""
    state = read_state(path)
    if state["step"] > max_steps:
        return f"checkpoint '{path}' is at step {state['step']}, past train.max_steps={max_steps}"
    if "settings" not in state:  # written before deradiff recorded settings: nothing to compare
        return None
    saved_inputs = state.get("inputs", {})
    diff = settings_mismatch(state["settings"], settings)
    diff += [f"{k}: {saved_inputs[k]} -> {v}" for k, v in inputs.items() if k in saved_inputs and saved_inputs[k] != v]
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        return f"checkpoint '{path}' was trained with other settings ({shown})"
    return None


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
    from safetensors import SafetensorError

    _refuse_pickled_weights(path)
    state = read_state(path)
    _check_rng_state(accelerator, path, state.get("world_size"))
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeradiffError(f"checkpoint '{path}' could not be loaded: {first}") from exc
    return state


def _check_rng_state(accelerator: Accelerator, path: Path, saved_world_size: int | None) -> None:
    """accelerate skips an unreadable or missing RNG state with an info log and resumes on another random
    stream, so the result silently differs from the uninterrupted run: refuse instead. A rank the saved run
    did not have (resuming on more processes) has no state to restore."""
    from accelerate.utils import load
    from accelerate.utils.constants import RNG_STATE_NAME

    rng = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    if not rng.is_file():
        if saved_world_size in (None, accelerator.num_processes):
            raise DeradiffError(f"checkpoint '{path}' lacks {rng.name}; without it a resume would not continue the "
                                "same random stream (resume from an earlier checkpoint, or train.overwrite=true)")
        return
    try:
        load(rng)
    except Exception as exc:  # noqa: BLE001 - whatever accelerate would swallow
        raise DeradiffError(f"checkpoint '{path}' has a damaged {rng.name} ({type(exc).__name__}); resume from an "
                            "earlier checkpoint, or train.overwrite=true") from None


def check_fresh_start(output_dir: str | os.PathLike, overwrite: bool, remove: bool = True) -> None:
    """A run that does not resume must not silently mix with another run's checkpoints and LoRA in the same
    folder (a later `resume_from=latest` would pick the old run's steps). Refuse, or clear them on request.
    Every process checks (so all of them stop together); only the one with `remove` deletes."""
    previous = check_results_absent(Path(output_dir), (CHECKPOINTS, FINAL_LORA), overwrite, refusal=_training_run)
    for path in previous if remove else []:
        remove_dir(path)


def _training_run(folder: str, found: list[Path]) -> str:
    """The refusal of a fresh start: a trainer's earlier results can also be continued."""
    names = ", ".join(f"{p.name}/" for p in found)
    return (f"output_dir '{folder}' already holds a training run ({names}); pass train.resume_from=latest to "
            "continue it, train.overwrite=true to start over, or another output_dir")


def _refuse_pickled_weights(path: Path) -> None:
    """Checkpoints written here hold model.safetensors; a pickled pytorch_model*.bin can run code when loaded.
    accelerate loads registered custom states (DDPO's reward statistics) with weights_only=False, so each must
    first load with weights_only=True (plain tensors, numbers and containers) or the checkpoint is refused."""
    from accelerate.utils import load

    pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
    if pickled:
        raise DeradiffError(
            f"checkpoint '{path}' holds pickled model weights ({', '.join(pickled)}); deradiff resumes only from "
            "safetensors weights (model.safetensors) because pickles can run code when loaded"
        )
    for custom in sorted(path.glob("custom_checkpoint_*.pkl")):
        try:
            load(custom, map_location="cpu")
        except Exception:  # noqa: BLE001 - anything but plain data is refused
            raise DeradiffError(f"checkpoint '{path}': {custom.name} holds more than plain data (or is damaged); "
                                "deradiff does not unpickle it") from None


def _prune(output_dir: str | os.PathLike, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        remove_dir(old)
