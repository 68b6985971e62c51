"""Shared trainer infrastructure on a tiny UNet: resume exactness, lock, non-finite stop, tracker, LoRA save."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deradiff.errors import DeradiffError
from deradiff.models.lora import adapter_disabled, attach_lora
from deradiff.models.pipelines import read_lora_metadata
from deradiff.testing import tiny_sd_pipeline
from deradiff.training.config import OptimSection, TrackerSection, TrainSection
from deradiff.training.determinism import global_micro_batch, rank_micro_batch, step_generator
from deradiff.lock import LOCK_NAME, OutputDirLock
from deradiff.training.tracking import RecordingTracker
from deradiff.training.trainer import NonFiniteLossError, Trainer, read_history


def _setup(tmp_path, max_steps=4, checkpoint_every=0, resume_from=None, tracker=None, overwrite=False):
    torch.manual_seed(0)
    unet = tiny_sd_pipeline().unet
    params = attach_lora(unet, rank=2)
    train = TrainSection(
        max_steps=max_steps, micro_batch_size=2, gradient_accumulation_steps=2, seed=3,
        checkpoint_every=checkpoint_every, keep_checkpoints=0, resume_from=resume_from, overwrite=overwrite,
    )
    trainer = Trainer(train, OptimSection(lr=1e-2, warmup_steps=1), TrackerSection(backend="none"), str(tmp_path),
                      tracker_override=tracker or RecordingTracker())
    model = trainer.prepare(unet, params)
    text = torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(1))

    def micro_loss(micro_step):
        g = step_generator(3, micro_step, trainer.rank)
        idx = rank_micro_batch(8, micro_step, 2, trainer.world_size, trainer.rank, seed=3)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        out = model(x, t, text[idx]).sample
        return (out - x).pow(2).mean(), {"x_mean": float(x.mean())}

    return trainer, model, micro_loss


def _lora(path):
    return load_file(str(path / "lora" / "pytorch_lora_weights.safetensors"))


def test_determinism_helpers_are_counter_based():
    a = global_micro_batch(10, 7, 4, seed=1)
    assert torch.equal(a, global_micro_batch(10, 7, 4, seed=1))
    # one epoch (2 micro-batches of 4 out of 10, drop_last) never repeats an item
    epoch = torch.cat([global_micro_batch(10, i, 4, seed=1) for i in range(2)])
    assert len(set(epoch.tolist())) == 8
    # 2 ranks x 2 see the same global stream as 1 rank x 4
    both = torch.cat([rank_micro_batch(10, 5, 2, 2, r, seed=1) for r in range(2)])
    assert torch.equal(both, global_micro_batch(10, 5, 4, seed=1))
    assert not torch.equal(torch.randn(3, generator=step_generator(0, 1, 0)), torch.randn(3, generator=step_generator(0, 1, 1)))


def test_run_logs_saves_and_resumes_exactly(tmp_path):
    rec = RecordingTracker()
    trainer, _, micro = _setup(tmp_path / "full", tracker=rec)
    summary = trainer.run(lambda s: trainer.accumulate(s, micro), {"method": "test", "beta": 1.0})
    assert summary["steps_run"] == 4 and summary["effective_batch_size"] == 4
    assert rec.config["launch"]["effective_batch_size"] == 4 and rec.finished
    assert len(rec.series("loss")) == 4 and all(v > 0 for v in rec.series("lr"))
    meta = read_lora_metadata(tmp_path / "full" / "lora")
    assert meta["method"] == "test" and meta["steps"] == 4 and meta["lora_rank"] == 2 and meta["seed"] == 3
    assert not (tmp_path / "full" / LOCK_NAME).exists()

    # interrupted after the step-2 checkpoint, then resumed from `latest` in the same folder
    out = tmp_path / "resumed"
    trainer, _, micro = _setup(out, checkpoint_every=2)

    def crash_at_3(step):
        if step == 3:
            raise KeyboardInterrupt
        return trainer.accumulate(step, micro)

    with pytest.raises(KeyboardInterrupt):
        trainer.run(crash_at_3, {"method": "test"})
    assert (out / "checkpoints" / "step-00000002" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # released on the way out
    trainer, _, micro = _setup(out, checkpoint_every=2, resume_from="latest")
    summary = trainer.run(lambda s: trainer.accumulate(s, micro), {"method": "test"})
    assert summary["steps_run"] == 2
    full, resumed = _lora(tmp_path / "full"), _lora(out)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0)
    # the curves of the interrupted and the resumed part join into those of the uninterrupted run
    history = [read_history(d, 4) for d in (tmp_path / "full", out)]
    assert [h["step"] for h in history[1]] == [1, 2, 3, 4]
    assert [h["loss"] for h in history[1]] == pytest.approx([h["loss"] for h in history[0]], rel=1e-6)


def test_adapter_disabled_is_the_base_model(tmp_path):
    torch.manual_seed(0)
    unet = tiny_sd_pipeline().unet
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32)
    base = unet(x, t, text).sample
    attach_lora(unet, rank=2)
    for p in unet.parameters():
        if p.requires_grad:
            p.data.normal_()  # make the adapter non-trivial
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, text).sample, base)
        with adapter_disabled(unet) as ref:
            torch.testing.assert_close(ref(x, t, text).sample, base)
        assert not torch.allclose(unet(x, t, text).sample, base)


def test_non_finite_loss_names_the_step(tmp_path):
    trainer, model, micro = _setup(tmp_path)

    def bad(micro_step):
        loss, m = micro(micro_step)
        return (loss * float("nan") if micro_step >= 3 else loss), m

    with pytest.raises(NonFiniteLossError, match="at step 1 "):
        trainer.run(lambda s: trainer.accumulate(s, bad), {"method": "test"})


HOLD_LOCK = """
import sys
from deradiff.lock import OutputDirLock
lock = OutputDirLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
input()
"""


def test_lock_refuses_a_live_owner_and_a_killed_owner_never_blocks(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        with pytest.raises(DeradiffError) as refused:
            OutputDirLock(tmp_path).acquire()
        assert f"'{tmp_path}' is in use by another run (pid {live.pid} on " in str(refused.value)
    finally:
        live.kill()
        live.communicate()
    assert (tmp_path / LOCK_NAME).is_file()  # left behind by the killed owner, whose OS lock died with it
    with OutputDirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_damaged_leftover_lock_file_never_blocks_and_a_second_lock_in_one_process_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    with OutputDirLock(tmp_path):
        with pytest.raises(DeradiffError, match=f"in use by another run \\(pid {os.getpid()} on "):
            OutputDirLock(tmp_path).acquire()


def test_wandb_online_failure_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    from deradiff.training.tracking import WandbTracker

    modes = []
    real_init = wandb.init

    def fake_init(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise RuntimeError("no network")
        return real_init(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.warns(UserWarning, match="logging offline instead"):
        tracker = WandbTracker(TrackerSection(mode="online"), str(tmp_path), "t")
    tracker.log_scalars({"loss": 1.0}, step=1)
    tracker.log_images("samples", torch.rand(2, 3, 8, 8), ["a", "b"], step=1)
    tracker.finish({"final_loss": 1.0})
    assert modes == ["online", "offline"]
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/*.png"))


def test_w_and_b_runs_get_their_group_and_job_type_as_arguments(tmp_path, monkeypatch):
    """Was: the group and job type went through WANDB_RUN_GROUP / WANDB_JOB_TYPE, set while the runs started."""
    import wandb

    from deradiff.eval.tracking import default_factory

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(kwargs))
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    default_factory("study-s", "eval")(TrackerSection(mode="offline"), str(tmp_path), "eval-anchor")
    assert (runs[0]["group"], runs[0]["job_type"], runs[0]["name"]) == ("study-s", "eval", "eval-anchor")
    assert "WANDB_RUN_GROUP" not in os.environ
    trainer = Trainer(TrainSection(), OptimSection(), TrackerSection(), str(tmp_path / "run"), group="study-s")
    assert trainer.wandb_group == "study-s"
    monkeypatch.setenv("WANDB_RUN_GROUP", "mine")  # a user's own group, for a run no caller groups
    assert Trainer(TrainSection(), OptimSection(), TrackerSection(), str(tmp_path / "run")).wandb_group == "mine"


def test_fresh_run_refuses_an_earlier_runs_folder_unless_overwrite(tmp_path):
    trainer, _, micro = _setup(tmp_path, max_steps=2, checkpoint_every=1)
    trainer.run(lambda s: trainer.accumulate(s, micro), {"method": "test"})
    first = _lora(tmp_path)
    with pytest.raises(DeradiffError, match=r"already holds a training run \(checkpoints/, lora/\).*resume_from=latest"):
        _setup(tmp_path, max_steps=2)  # refused when the trainer is built, before any model or data work
    assert all(torch.equal(first[k], v) for k, v in _lora(tmp_path).items())  # nothing lost
    trainer, _, micro = _setup(tmp_path, max_steps=2, overwrite=True)
    trainer.run(lambda s: trainer.accumulate(s, micro), {"method": "test"})
    # the earlier run's checkpoints are gone, not mixed in: only this run's final one remains
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
