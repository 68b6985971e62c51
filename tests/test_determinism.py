"""Determinism on CPU: the same config and seed give a bitwise-identical adapter (`deradiff train dpo`) and
bitwise-identical images (`deradiff realign`); a different seed gives a different result (so the
comparisons can fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from PIL import Image

from test_reliability_helpers import LORA_FILE, lora_tensors, run_cli, tiny_assets, train_args, write_lora


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("determinism"))


def test_same_config_and_seed_give_a_bitwise_identical_adapter(assets, capsys):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("other-seed", 6)):
        out = assets["root"] / name
        code, _, err = run_cli(train_args(assets["config"], out, "train.max_steps=3", f"train.seed={seed}"), capsys)
        assert code == 0, err
        runs[name] = lora_tensors(out)
    a, b = runs["a"], runs["b"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Same header metadata too. (Not the raw file bytes: safetensors writes its metadata map in a random
    # key order per save, so two identical adapters can differ in header byte order.)
    assert _file_metadata(assets["root"] / "a") == _file_metadata(assets["root"] / "b")
    assert any(not torch.equal(a[k], runs["other-seed"][k]) for k in a)


def _file_metadata(run: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(run / "lora" / LORA_FILE), framework="pt") as f:
        return f.metadata()


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


def test_realign_cli_gives_identical_images_for_the_same_seeds(assets, tmp_path, capsys):
    from deradiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    torch.manual_seed(1)
    pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                          init_lora_weights=False))
    lora = write_lora(tmp_path / "lora", pipe, {"base_model": str(assets["base"]), "method": "dpo", "beta": 0.1})
    common = [f"base_model={assets['base']}", f"lora_dir={lora}", "prompts=[a red circle, a blue square]",
              "lambdas=[0, 0.5, 2]", "steps=3", "device=cpu", "sampler=ddim", "eta=1.0"]
    for name, seeds in (("a", "[0, 1]"), ("b", "[0, 1]"), ("c", "[2, 3]")):
        code, _, err = run_cli(["realign", f"output_dir={tmp_path / name}", f"seeds={seeds}", *common], capsys)
        assert code == 0, err
    a, b, c = (_images(tmp_path / n) for n in "abc")
    assert len(a) == 2 * 3 * 2 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "manifest.csv").read_text() == (tmp_path / "b" / "manifest.csv").read_text()
    other = [np.array_equal(a[k], c[k.replace("seed0", "seed2").replace("seed1", "seed3")]) for k in a]
    assert not any(other)
