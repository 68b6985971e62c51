"""The eval stage end to end on tiny random models (seconds): shared noise, all outputs, numbers from the run.

The retrained LoRAs here are the anchor's LoRA scaled in weight space (B * beta0/beta), so the weight-scaled
baseline must reproduce them exactly: a sharp check of shared noise, variant plumbing and pair metrics.
"""

from __future__ import annotations

import json
import math
import os
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from deradiff.config import load_config
from deradiff.errors import DeradiffError
from deradiff.eval.stage import run_eval
from deradiff.eval.config import EvalConfig
from deradiff.eval.plan import default_lambdas
from deradiff.eval.scoring import pixel_features
from deradiff.testing import save_random_lora, tiny_sd_pipeline
from deradiff.training.tracking import RecordingTracker

BETA0 = 1.0


def brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def _lora(base_dir, out_dir, beta: float, scale: float) -> str:
    return save_random_lora(out_dir, {"base_model": str(base_dir), "method": "dpo", "beta": beta}, scale)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "base")
    anchor = _lora(root / "base", root / "anchor", BETA0, 1.0)
    retrained = [_lora(root / "base", root / f"b{b:g}", b, BETA0 / b) for b in (0.5, 2.0)]
    return anchor, retrained


def _config(out, loras, *extra: str) -> EvalConfig:
    anchor, retrained = loras
    overrides = [f"output_dir={out}", f"anchor_lora={anchor}", f"retrained_loras={json.dumps(retrained)}",
                 "prompts=[red circle, blue square]", "seeds=[0, 1, 2]", "sampling.steps=4", "extra_lambdas=[1.5]",
                 "kid_features=pixels", "grid_seeds=3", "bootstrap.replicates=100", *extra]
    return load_config(EvalConfig, None, overrides)


@pytest.fixture(scope="module")
def finished(loras, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out") / "run"
    trackers: dict[str, RecordingTracker] = {}

    def factory(section, output_dir, name):
        return trackers.setdefault(name, RecordingTracker())

    cfg = _config(out, loras)
    result = run_eval(cfg, rewards={"brightness": brightness}, features=pixel_features, tracker_factory=factory)
    return out, result, trackers


def test_default_lambda_grid():
    assert default_lambdas(1.0, [0.5, 2.0, 1.0], [1.5, 2.0]) == [0.5, 1.5, 2.0]


def test_weight_scaled_reproduces_weight_space_retraining_exactly(finished):
    _, result, _ = finished
    rows = {r["name"]: r for r in result.results["models"]}
    for lam, beta in ((0.5, 2.0), (2.0, 0.5)):
        scaled = rows[f"weight_scaled-l{lam:g}"]
        assert scaled["target"] == f"retrained-b{beta:g}"
        assert scaled["mse_vs_target"] < 1e-10  # same noise + same weights => same images
        assert rows[f"realigned-l{lam:g}"]["target"] == f"retrained-b{beta:g}"
    assert rows["base"]["path_kl"] == 0.0
    assert rows["retrained-b2"]["path_kl"] < rows["retrained-b1"]["path_kl"] < rows["retrained-b0.5"]["path_kl"]
    assert rows["realigned-l0.5"]["path_kl"] < rows["realigned-l1.5"]["path_kl"] < rows["realigned-l2"]["path_kl"]
    assert rows["retrained-b1"]["anchor"] is True


def test_every_number_in_the_results_comes_from_the_saved_samples(finished):
    out, result, _ = finished
    saved = load_file(str(out / "samples.safetensors"))
    table = pd.read_csv(out / "results.csv").set_index("name")
    for name in table.index:
        images = saved[f"{name}/images"].float() / 255
        assert table.loc[name, "reward_brightness"] == pytest.approx(float(images.mean()), abs=2 / 255)
        assert table.loc[name, "path_kl"] == pytest.approx(float(saved[f"{name}/path_kl"].mean()), rel=1e-5)
    on_disk = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in on_disk["models"]] == list(table.index)
    assert len(pd.read_csv(out / "samples.csv")) == len(table) * 6
    errors = pd.read_csv(out / "approximation.csv")
    assert set(errors["kind"]) == {"realigned", "weight_scaled"}


def test_report_is_self_contained_with_every_plot_and_grid(finished):
    out, result, _ = finished
    page = result.report.read_text()
    assert result.report == out / "report.html"
    files = result.results["plots"] + [g["file"] for g in result.results["grids"]]
    assert any("pareto" in f for f in files) and len(result.results["grids"]) == 2
    for f in files:
        assert (out / f).stat().st_size > 0
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(files)
    assert "LPIPS is not computed" in page


def test_one_tracker_run_per_model_with_consistent_keys(finished):
    _, result, trackers = finished
    names = [f"eval-{r['name']}" for r in result.results["models"]]
    assert set(trackers) == {*names, "eval-report"}
    for name in names:
        config = trackers[name].config
        assert {"kind", "method", "beta", "lambda", "effective_beta"} <= set(config)
        assert trackers[name].finished and trackers[name].images
    assert trackers["eval-realigned-l0.5"].config["effective_beta"] == pytest.approx(2.0)
    assert any(k.startswith("approx_error/realigned/") for _, v in trackers["eval-report"].scalars for k in v)


def test_refuses_to_overwrite_results(finished, loras):
    out, _, _ = finished
    with pytest.raises(DeradiffError, match="overwrite=true"):
        run_eval(_config(out, loras), rewards={"brightness": brightness}, features=None)


def _two_process_eval(cfg: EvalConfig, marker_dir: str) -> None:
    """Runs in each of 2 gloo processes: record the world size, then the same eval as one process did."""
    from pathlib import Path

    from accelerate.state import AcceleratorState

    from deradiff.eval.generate import process_state

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from pytest: start from a clean state
    os.environ["OMP_NUM_THREADS"] = "1"  # else accelerate sets 2 threads per process on a 2-core box
    state = process_state()
    torch.set_num_threads(1)
    (Path(marker_dir) / f"rank{state.process_index}").write_text(str(state.num_processes))
    run_eval(cfg, rewards={"brightness": brightness}, features=pixel_features)


def test_two_processes_split_sampling_and_gather_the_same_results(finished, loras, tmp_path):
    from accelerate import debug_launcher
    from accelerate.state import AcceleratorState

    _, single, _ = finished
    cfg = _config(tmp_path / "two", loras, "tracker.backend=none")
    debug_launcher(lambda: _two_process_eval(cfg, str(tmp_path)), num_processes=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert sorted(p.read_text() for p in tmp_path.glob("rank*")) == ["2", "2"]  # really two processes
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for a, b in zip(single.results["samples"], two["samples"]):
        assert (a["name"], a["prompt"], a["seed"]) == (b["name"], b["prompt"], b["seed"])
        assert b["reward_brightness"] == pytest.approx(a["reward_brightness"], abs=1e-5)
        assert b["path_kl"] == pytest.approx(a["path_kl"], rel=1e-4, abs=1e-6)


def test_stacked_branches_give_the_samples_of_the_default(finished, loras, tmp_path, monkeypatch):
    """sampling.branches=stacked runs the realigned lambdas' branches in one forward per step (auto runs two calls
    at these row counts); the saved samples agree up to float rounding."""
    from deradiff.realignment.batched import BranchBatcher

    out, _, _ = finished
    stacked_calls: list[int] = []
    original_run = BranchBatcher.run
    monkeypatch.setattr(BranchBatcher, "run", lambda self, *a: stacked_calls.append(1) or original_run(self, *a))
    cfg = _config(tmp_path / "stacked", loras, "sampling.branches=stacked", "weight_scaled=false")
    run_eval(cfg, rewards={"brightness": brightness}, features=pixel_features,
             tracker_factory=lambda section, output_dir, name: RecordingTracker())
    # the 3 realigned lambdas are one batch of trajectories: one stacked forward per step and chunk of jobs
    chunks = math.ceil(6 / max(1, cfg.sampling.batch_size // 3))
    assert len(stacked_calls) == chunks * cfg.sampling.steps
    auto, stacked = load_file(str(out / "samples.safetensors")), load_file(str(tmp_path / "stacked" / "samples.safetensors"))
    realigned = [key for key in stacked if key.startswith("realigned")]
    assert len(realigned) == 6
    for key in realigned:
        if key.endswith("/images"):
            assert (stacked[key].int() - auto[key].int()).abs().max() <= 1, key
        else:
            torch.testing.assert_close(stacked[key], auto[key], rtol=1e-4, atol=1e-4)
