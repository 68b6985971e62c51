"""`deradiff realign` end to end on a tiny random pipeline + LoRA saved with stock diffusers."""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deradiff import cli
from deradiff.config import load_config
from deradiff.realignment.config import RealignConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_and_lora(tmp_path, lora_sd_pipe):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from deradiff.testing import tiny_sd_pipeline

    base, lora = tmp_path / "base", tmp_path / "lora"
    tiny_sd_pipeline().save_pretrained(base)
    StableDiffusionPipeline.save_lora_weights(lora, unet_lora_layers=get_peft_model_state_dict(lora_sd_pipe.unet))
    (lora / "deradiff_metadata.json").write_text(json.dumps({"base_model": str(base), "method": "dpo", "beta": 0.1}))
    return base, lora


def test_cli_end_to_end(tmp_path, model_and_lora, capsys, monkeypatch):
    from deradiff.realignment.batched import BranchBatcher

    stacked_calls: list[int] = []
    original_run = BranchBatcher.run
    monkeypatch.setattr(BranchBatcher, "run", lambda self, *a: stacked_calls.append(1) or original_run(self, *a))
    base, lora = model_and_lora
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    args = ["realign", f"output_dir={out}", f"base_model={base}", f"lora_dir={lora}", f"prompts_file={prompts}",
            "lambdas=[0, 0.5, 2]", "seeds=[3, 4]", "steps=2", "sampler=euler_a", "device=cpu"]
    assert cli.main(args) == 0, capsys.readouterr().err

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 2 * 3 * 2
    assert {(r["prompt"], r["seed"], r["lambda"]) for r in rows} >= {("a blue square", "4", "2.0")}
    by_lambda = {r["lambda"]: r for r in rows if r["seed"] == "3" and r["prompt_index"] == "0"}
    assert by_lambda["0.0"]["effective_beta"] == "" and by_lambda["0.0"]["strength"] == "base"
    assert float(by_lambda["0.5"]["effective_beta"]) == pytest.approx(0.2)  # beta 0.1 from the metadata
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 12 and manifest["lora_metadata"]["beta"] == 0.1
    for row in rows:
        assert Image.open(out / row["file"]).size == (16, 16)
    grids = sorted((out / "grids").iterdir())
    assert len(grids) == 2 and Image.open(grids[0]).size == (2 * 16, 3 * 16)  # columns seeds, rows lambdas

    first = np.asarray(Image.open(out / rows[0]["file"]))
    assert cli.main(args) == 2  # refuses a non-empty output_dir
    assert "overwrite=true" in capsys.readouterr().err
    stacked_calls.clear()
    assert cli.main([*args, "overwrite=true"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / rows[0]["file"])), first)  # same seed, same image
    # 12 rows per call (3 lambdas x 2 seeds, CFG). auto stacks step 0 only, where the lambdas share x_T
    # (4 + 4 rows needed); at step 1 stacking would add 8 rows (12 + 8 needed), so two calls
    assert len(stacked_calls) == 2  # 2 prompts x step 0
    auto = {row["file"]: np.asarray(Image.open(out / row["file"])).astype(int) for row in rows}
    stacked_calls.clear()
    assert cli.main([*args, "overwrite=true", "branches=stacked"]) == 0
    assert len(stacked_calls) == 2 * 2  # 2 prompts x 2 steps, one stacked forward each
    for file, image in auto.items():
        assert np.abs(np.asarray(Image.open(out / file)).astype(int) - image).max() <= 1, file
    assert "branches: stacked" in (out / "config.yaml").read_text()


def test_cli_bad_input_is_one_line_error(tmp_path, model_and_lora, capsys):
    base, lora = model_and_lora
    common = [f"output_dir={tmp_path / 'o'}", f"base_model={base}", "prompts=[x]", "steps=1"]
    assert cli.main(["realign", *common, f"lora_dir={lora}", "lambdas=[0.5, -1]"]) == 2
    assert "lambdas[1]" in capsys.readouterr().err
    assert cli.main(["realign", *common, f"lora_dir={tmp_path / 'none'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_config_loads():
    config = load_config(RealignConfig, ROOT / "configs/tiny/realign.yaml")
    assert config.lambdas[0] == 0.0 and config.sampler == "ddim"


def test_entry_script_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["realign/sample.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "realign/sample.py"), run_name="__main__")
    assert exc.value.code == 0 and "lambdas" in capsys.readouterr().out
