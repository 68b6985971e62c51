"""Kill and resume: a real `deradiff train dpo` process is SIGKILLed (mid-checkpoint-save or right after one) at
seeded-random steps, resumed with `resume_from=latest`, and must end with the adapter of an uninterrupted run.

Also: a second run on an output_dir held by a live run is refused (an OS file lock, which dies with its
process), and an interrupted checkpoint save or prune never leaves a `step-N` folder that `latest` would pick
but that fails to load.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deradiff.training.checkpoint import list_checkpoints, resolve_resume
from deradiff.lock import LOCK_NAME
from test_reliability_helpers import lora_tensors, max_abs_diff, run_cli, tiny_assets, train_args

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 8
KILL_STEPS = sorted(random.Random(20261201).sample(range(2, MAX_STEPS), 3))  # three distinct steps in 2..7

# The child is the real CLI; the only instrumentation is a pause (and a marker file the test watches) inside
# or right after the checkpoint save of step KILL_STEP, so the SIGKILL lands exactly there on any machine load.
CHILD = r"""
import os, pathlib, sys, time
import accelerate
import deradiff.training.trainer as trainer
from deradiff.cli import main

step, mode, marker = int(os.environ["KILL_STEP"]), os.environ["KILL_MODE"], pathlib.Path(os.environ["KILL_MARKER"])
save_state, save_checkpoint = accelerate.Accelerator.save_state, trainer.save_checkpoint

def paused_save_state(self, output_dir=None, **kwargs):
    result = save_state(self, output_dir, **kwargs)
    if mode == "during_save" and pathlib.Path(output_dir).name == f".step-{step:08d}.tmp":
        marker.write_text(str(os.getpid())); time.sleep(120)
    return result

def paused_save_checkpoint(accelerator, output_dir, at_step, *args, **kwargs):
    result = save_checkpoint(accelerator, output_dir, at_step, *args, **kwargs)
    if mode == "after_save" and at_step == step:
        marker.write_text(str(os.getpid())); time.sleep(120)
    return result

accelerate.Accelerator.save_state = paused_save_state
trainer.save_checkpoint = paused_save_checkpoint
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def reference(assets):
    """The uninterrupted run (in-process, one thread like the children)."""
    from deradiff import cli

    out = assets["root"] / "reference"
    assert cli.main(train_args(assets["config"], out)) == 0
    return lora_tensors(out)


def _start_child(args: list[str], step: int, mode: str, marker: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KILL_STEP": str(step), "KILL_MODE": mode, "KILL_MARKER": str(marker),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(marker: Path, child: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"training child exited ({child.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"training child never reached the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _kill_run_at(assets, out: Path, step: int, mode: str, resume: bool) -> subprocess.Popen:
    """Start the CLI in a child, wait until it pauses at `step` in `mode`, leave it alive (caller kills)."""
    marker = out.parent / f"{out.name}-kill-{step}"
    marker.unlink(missing_ok=True)
    args = train_args(assets["config"], out, *(["train.resume_from=latest"] if resume else []))
    child = _start_child(args, step, mode, marker, out.parent / f"{out.name}-{step}.log")
    _wait_for(marker, child, out.parent / f"{out.name}-{step}.log")
    return child


def _sigkill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def _check_killed_state(out: Path, step: int, mode: str) -> None:
    """After the kill: no final adapter, and `latest` is a complete checkpoint (never the half-saved one)."""
    assert not (out / "lora").exists() and not (out / "summary.json").exists()
    latest = resolve_resume(out, "latest")
    expected = step - 1 if mode == "during_save" else step
    assert latest is not None and latest.name == f"step-{expected:08d}"
    if mode == "during_save":
        assert (out / "checkpoints" / f".step-{step:08d}.tmp").is_dir()  # the interrupted save, ignored
        assert not (out / "checkpoints" / f"step-{step:08d}").exists()
    assert (latest / "model.safetensors").is_file() and (latest / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_sigkill_during_checkpoint_save_then_resume_matches_uninterrupted(assets, reference, capsys):
    """Default-suite case: killed in the middle of saving step KILL_STEPS[0]; a second run is refused while the
    killed run is still alive; `latest` skips the half-written checkpoint; the resumed adapter is exact."""
    out = assets["root"] / "killed-during-save"
    step = KILL_STEPS[0]
    child = _kill_run_at(assets, out, step, "during_save", resume=False)
    try:
        code, _, err = run_cli(train_args(assets["config"], out, "train.resume_from=latest"), capsys)
        assert code == 2, err
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and f"pid {child.pid}" in error_lines[0] and "in use by another run" in error_lines[0]
    finally:
        _sigkill(child)
    _check_killed_state(out, step, "during_save")
    assert (out / LOCK_NAME).is_file()  # left behind by the killed owner; the resumed run takes it over

    code, _, err = run_cli(train_args(assets["config"], out, "train.resume_from=latest"), capsys)
    assert code == 0, err
    assert max_abs_diff(lora_tensors(out), reference) <= 1e-6
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow  # ~30 s; the single-SIGKILL tests above keep resume-after-kill in the default suite
def test_three_sigkills_at_random_steps_then_resume_matches_uninterrupted(assets, reference, capsys):
    """Three kills of the same run at three seeded-random steps (mid-save, after a save, mid-save), each time
    resumed from `latest` by a fresh process; the final in-process resume equals the uninterrupted run."""
    out = assets["root"] / "killed-three-times"
    for i, (step, mode) in enumerate(zip(KILL_STEPS, ["during_save", "after_save", "during_save"])):
        child = _kill_run_at(assets, out, step, mode, resume=i > 0)
        _sigkill(child)
        _check_killed_state(out, step, mode)
    code, _, err = run_cli(train_args(assets["config"], out, "train.resume_from=latest"), capsys)
    assert code == 0, err
    assert max_abs_diff(lora_tensors(out), reference) <= 1e-6


def test_interrupted_prune_never_leaves_a_broken_latest(tmp_path, monkeypatch):
    """Deleting an old checkpoint (prune) or replacing a re-saved one is interrupted after removing its weights:
    the folder must already be out of the `step-N` namespace, so `latest` still resolves to a whole checkpoint."""
    import shutil

    from deradiff.fileio import remove_dir
    from deradiff.training import checkpoint as ck

    for step in (1, 2, 3):
        folder = ck.checkpoint_dir(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        (folder / ck.STATE_NAME).write_text('{"step": %d}' % step)
    real_rmtree = shutil.rmtree

    def dies_halfway(path, ignore_errors=False):
        path = Path(path)
        if path.exists():
            (path / "model.safetensors").unlink(missing_ok=True)  # the weights are gone, then the kill
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ck._prune(tmp_path, keep=1)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(ck.checkpoint_dir(tmp_path, 3))
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    for checkpoint in list_checkpoints(tmp_path):
        assert (checkpoint / "model.safetensors").is_file(), f"{checkpoint} listed but its weights are gone"
    assert resolve_resume(tmp_path, "latest").name == "step-00000002"
