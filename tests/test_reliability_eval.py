"""The eval fails before it samples when its inputs cannot give results, writes its numbers before any figure,
skips (with a note) a figure it cannot draw, and retires the W&B runs of the results a rerun replaces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deradiff.config import load_config
from deradiff.errors import DeradiffError
from deradiff.eval import stage
from deradiff.eval.stage import run_eval
from deradiff.eval.config import EvalConfig
from deradiff.testing import save_random_lora, tiny_sd_pipeline

BETA0 = 1.0


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def not_a_number(images: torch.Tensor, prompts) -> torch.Tensor:
    return torch.full((images.shape[0],), math.nan)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-faults")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "base")
    meta = {"base_model": str(root / "base"), "method": "dpo"}
    anchor = save_random_lora(root / "anchor", {**meta, "beta": BETA0}, 1.0)
    retrained = [save_random_lora(root / "b0.5", {**meta, "beta": 0.5}, 2.0)]
    return anchor, retrained


def _config(out, loras, *extra: str) -> EvalConfig:
    anchor, retrained = loras
    overrides = [f"output_dir={out}", f"anchor_lora={anchor}", f"retrained_loras={json.dumps(retrained)}",
                 "prompts=[red circle]", "seeds=[0, 1]", "sampling.steps=2", "extra_lambdas=[]", "kid_features=none",
                 "tracker.backend=none", "bootstrap.replicates=20", "grid_seeds=2", *extra]
    return load_config(EvalConfig, None, overrides)


def never_loads(*args):
    raise AssertionError("the eval loaded a model before refusing its input")


@pytest.mark.parametrize("extra, message", [
    (["seeds=[0]"], "at least 2 distinct seeds"),
    (["seeds=[3, 3]"], "at least 2 distinct seeds"),
    (["prompts=null", "num_prompts=0"], "num_prompts"),
    (["prompts=[]"], "prompts"),
])
def test_inputs_that_cannot_give_results_are_refused_when_the_config_loads(loras, tmp_path, extra, message):
    """Was: one seed sampled and scored every model, then crashed drawing a NaN diversity; num_prompts=0 failed
    late with a shape error."""
    with pytest.raises(DeradiffError, match=message):
        _config(tmp_path / "out", loras, *extra)


def test_a_figure_that_cannot_be_drawn_is_skipped_with_a_note(loras, tmp_path):
    out = tmp_path / "out"
    result = run_eval(_config(out, loras), rewards={"brightness": brightness, "nan": not_a_number})
    saved = json.loads((out / "results.json").read_text())
    assert any("reward_nan vs beta not drawn" in note for note in saved["skipped_plots"])
    assert "plots/reward_brightness_vs_beta.png" in saved["plots"]
    assert not (out / "plots" / "reward_nan_vs_beta.png").exists()
    assert "reward_nan vs beta not drawn" in result.report.read_text()


def test_results_are_on_disk_before_any_figure(loras, tmp_path, monkeypatch):
    """A plotting failure (here: a broken matplotlib backend) must not lose hours of sampling."""
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(stage.report, "plot_metric", broken)
    with pytest.raises(RuntimeError, match="no display"):
        run_eval(_config(out, loras), rewards={"brightness": brightness})
    saved = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in saved["models"]} >= {"base", "retrained-b1", "retrained-b0.5", "realigned-l2"}


def test_a_rerun_retires_the_w_and_b_runs_of_the_results_it_replaces(loras, tmp_path):
    out = tmp_path / "out"
    run_eval(_config(out, loras), rewards={"brightness": brightness})
    stale = out / "wandb" / "offline-run-20260101_000000-old"
    stale.mkdir(parents=True)
    run_eval(_config(out, loras, "overwrite=true"), rewards={"brightness": brightness})
    assert not stale.exists() and (out / "wandb" / "replaced" / stale.name).is_dir()


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_sampling(loras, tmp_path, kind):
    out = tmp_path / "out"
    out.write_text("x") if kind == "file" else out.symlink_to(tmp_path / "gone")
    with pytest.raises(DeradiffError, match=f"output_dir '{out}'"):
        run_eval(_config(out, loras), loader=never_loads, rewards={"brightness": brightness})


def test_an_eval_refused_by_the_lock_samples_and_logs_nothing(loras, tmp_path):
    from deradiff.lock import OutputDirLock

    out = tmp_path / "out"
    with OutputDirLock(out), pytest.raises(DeradiffError, match="in use by another run"):
        run_eval(_config(out, loras, "tracker.backend=wandb", "tracker.mode=offline"), loader=never_loads,
                 rewards={"brightness": brightness})
    assert not (out / "wandb").exists()


def test_a_deleted_lora_is_named_as_missing_with_its_key(loras, tmp_path):
    """Was: "has no deradiff metadata", the text a folder without metadata gets."""
    anchor, retrained = loras
    gone = str(tmp_path / "deleted-lora")
    with pytest.raises(DeradiffError, match=r"config key 'retrained_loras\[0\]': LoRA folder .*deleted-lora' does not exist"):
        run_eval(_config(tmp_path / "out", (anchor, [gone])), loader=never_loads, rewards={"brightness": brightness})


@pytest.mark.slow  # ~10 s (two evals)
def test_an_overwrite_leaves_exactly_the_files_a_fresh_eval_writes(loras, tmp_path):
    """Was: an old grid and the old samples.safetensors stayed beside the new results (also on study reruns)."""
    from test_reliability_helpers import files_under

    two = ["prompts=[red circle, blue square]", "grid_prompts=2"]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    run_eval(_config(out, loras, *two, "save_samples=true"), rewards={"brightness": brightness})
    assert "grids/grid_1.png" in files_under(out) and "samples.safetensors" in files_under(out)
    smaller = ["prompts=[red circle, blue square]", "grid_prompts=1", "save_samples=false", "seeds=[0, 1, 2]"]
    run_eval(_config(out, loras, *smaller, "overwrite=true"), rewards={"brightness": brightness})
    run_eval(_config(fresh, loras, *smaller), rewards={"brightness": brightness})
    assert files_under(out) == files_under(fresh)


@pytest.mark.parametrize("other", [{"method": "dpo", "beta_units": "implicit"},
                                   {"method": "ddpo", "beta_units": "reward", "reward": "jpeg_compressibility"}])
def test_retrained_loras_with_beta_on_another_scale_are_refused(tmp_path, other):
    """Was: a DPO LoRA at beta 500 was compared with a reward_grad anchor at 0.08 as lambda 0.00016."""
    meta = {"base_model": str(tmp_path / "base"), "beta": 0.08, "method": "reward_grad", "beta_units": "reward",
            "reward": "vividness"}
    anchor = save_random_lora(tmp_path / "anchor", meta, 1.0, rank=1)
    retrained = save_random_lora(tmp_path / "other", {**meta, **other, "beta": 500.0}, 1.0, rank=1)
    with pytest.raises(DeradiffError, match=r"retrained_loras\[0\].*on different scales"):
        run_eval(_config(tmp_path / "out", (anchor, [retrained])), loader=never_loads, rewards={"brightness": brightness})


@pytest.mark.parametrize("damage, note", [
    ("truncated", "unreadable"),
    ("wrong count", "5 images, expected 4"),
    ("nan", "non-finite values"),
])
def test_a_damaged_oracle_cache_is_sampled_again(tmp_path, capsys, damage, note):
    """Was: a truncated cache exited 1 (SafetensorError), one of the wrong shape failed in the reward
    (exit 1), one holding NaNs was reported as low ESS. Now each is named and re-sampled (it is a cache)."""
    from safetensors.torch import save_file

    from deradiff.eval.validation import read_cache

    path = tmp_path / "base.safetensors"
    save_file({"images": torch.rand(4, 3, 8, 8).half()}, str(path))
    assert read_cache(path, 4) is not None
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        images = torch.rand(5 if damage == "wrong count" else 4, 3, 8, 8).half()
        images[0, 0, 0, 0] = math.nan if damage == "nan" else 0.5
        save_file({"images": images}, str(path))
    assert read_cache(path, 4) is None
    assert f"oracle cache '{path}' is damaged ({note}" in capsys.readouterr().out
