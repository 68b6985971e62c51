"""Reliability of realignment (issue #12): text-encoder LoRAs, diffusers' LoRA controls and save_pretrained on
a realigned pipeline, corrupt LoRAs and non-finite images, missing LoRA folders, and the realign CLI's output
folder (lock, overwrite after an interrupted run, unique file names, duplicate lambdas, unusable paths).

Everything runs on tiny random SD models; CLI cases go through the real `deradiff` entry.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import deradiff
from deradiff.errors import DeradiffError
from deradiff.testing import save_tiny_base, tiny_sd_pipeline
from test_bad_input import assert_one_line_error
from test_reliability_helpers import LORA_FILE, files_under, run_cli, write_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _pipe_with_unet_lora(targets: list[str] = TARGETS, b_value: float | None = None):
    """A tiny SD pipeline whose UNet carries a random peft LoRA (B set to `b_value` everywhere if given)."""
    import peft

    pipe = tiny_sd_pipeline()
    torch.manual_seed(1)
    pipe.unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    if b_value is not None:
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_B" in name:
                    param.fill_(b_value)
    return pipe


def _add_text_encoder_adapter(pipe):
    """A random peft LoRA on the text encoder, injected by peft itself (transformers' own `add_adapter` and
    `load_adapter` need peft >= 0.22 here, so diffusers cannot load a text-encoder LoRA in this environment)."""
    import peft

    torch.manual_seed(2)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False), pipe.text_encoder)
    return pipe


def _write_text_encoder_lora(folder: Path) -> Path:
    """A LoRA on the UNet *and* the text encoder, saved with stock diffusers (text_encoder_lora_layers)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = _add_text_encoder_adapter(_pipe_with_unet_lora())
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)))
    return folder


def _write_non_finite_lora(source: Path, folder: Path, value: float) -> Path:
    """A copy of `source` with one weight set to NaN/inf: the safetensors header stays valid."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    tensors = load_file(str(source / LORA_FILE))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = value
    save_file(tensors, str(folder / LORA_FILE))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("realign-reliability")
    base = Path(save_tiny_base(root / "base"))
    meta = {"base_model": str(base), "method": "dpo", "beta": 0.1}
    w = {"root": root, "base": base}
    (root / "lora").mkdir()
    w["lora"] = write_lora(root / "lora", _pipe_with_unet_lora(), meta)
    (root / "diverging").mkdir()  # finite weights, but lambda 1 overflows to NaN images (lambda 0 is the base)
    w["diverging"] = write_lora(root / "diverging", _pipe_with_unet_lora(["to_out.0"], b_value=1e30), meta)
    w["te_lora"] = _write_text_encoder_lora(root / "te-lora")
    w["nan_lora"] = _write_non_finite_lora(w["lora"], root / "nan-lora", float("nan"))
    w["inf_lora"] = _write_non_finite_lora(w["lora"], root / "inf-lora", float("inf"))
    return w


def realign_args(w, out: Path, *overrides: str) -> list[str]:
    return ["realign", f"output_dir={out}", f"base_model={w['base']}", f"lora_dir={w['lora']}", "prompts=[a red circle]",
            "lambdas=[0, 1]", "seeds=[0]", "steps=2", "device=cpu", *overrides]


def _sample(pipe) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def _stock_lora_pipe(lora: Path):
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(lora))
    return pipe


# --- 1. text-encoder LoRAs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_text_encoder_lora_is_refused_by_realign(world, lam):
    """Was: at lambda 0 the text-encoder adapter stayed on (one prompt encoding for both branches)."""
    pipe = _add_text_encoder_adapter(_stock_lora_pipe(world["lora"]))
    with pytest.raises(DeradiffError, match="pipe.text_encoder carries an active LoRA adapter") as exc:
        deradiff.realign(pipe, lam=lam)
    assert "\n" not in str(exc.value)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # nothing was installed


def test_a_disabled_text_encoder_adapter_is_not_refused_and_lambda_0_is_the_base(world):
    from diffusers.loaders.lora_base import disable_lora_for_text_encoder

    pipe = _add_text_encoder_adapter(_stock_lora_pipe(world["lora"]))
    disable_lora_for_text_encoder(pipe.text_encoder)
    deradiff.realign(pipe, lam=0.0)
    assert np.array_equal(_sample(pipe), _sample(tiny_sd_pipeline()))


def test_text_encoder_lora_is_refused_at_load(world, tmp_path, capsys):
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, f"lora_dir={world['te_lora']}"), capsys)
    assert_one_line_error(code, err, str(world["te_lora"] / LORA_FILE), "adapts the text encoder", "text_encoder.")
    assert not out.exists()


# --- 2. diffusers' LoRA controls while realigned -------------------------------------------------------------
CONTROLS = {
    "disable_lora": lambda pipe, w: pipe.disable_lora(),
    "enable_lora": lambda pipe, w: pipe.enable_lora(),
    "fuse_lora": lambda pipe, w: pipe.fuse_lora(),
    "unload_lora_weights": lambda pipe, w: pipe.unload_lora_weights(),
    "set_adapters": lambda pipe, w: pipe.set_adapters("default_0", 0.5),
    "delete_adapters": lambda pipe, w: pipe.delete_adapters("default_0"),
    "load_lora_weights": lambda pipe, w: pipe.load_lora_weights(str(w["lora"]), adapter_name="second"),
    "unet.disable_adapters": lambda pipe, w: pipe.unet.disable_adapters(),
    "unet.enable_adapters": lambda pipe, w: pipe.unet.enable_adapters(),
    "unet.set_adapter": lambda pipe, w: pipe.unet.set_adapter("default_0"),
    "unet.add_adapter": lambda pipe, w: pipe.unet.add_adapter(__import__("peft").LoraConfig(r=1, target_modules=["to_q"])),
}


@pytest.mark.parametrize("control", list(CONTROLS))
def test_lora_controls_are_refused_while_realigned(world, control):
    """Was: silently ignored (the denoiser was skipped), or 'missing adapters' for set_adapters."""
    pipe = _stock_lora_pipe(world["lora"])
    deradiff.realign(pipe, lam=0.5)
    before = _sample(pipe)
    with pytest.raises(DeradiffError, match=r"realigned pipeline .*call deradiff\.unrealign\(pipe\) first") as exc:
        CONTROLS[control](pipe, world)
    assert "\n" not in str(exc.value)
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}  # nothing loaded, deleted or unloaded
    assert np.array_equal(_sample(pipe), before)


def test_unfuse_lora_acts_on_the_real_denoiser(world):
    """Nothing can be fused while realigned, so unfusing the real layers changes nothing; no error."""
    pipe = _stock_lora_pipe(world["lora"])
    deradiff.realign(pipe, lam=0.5)
    before = _sample(pipe)
    with pytest.warns(UserWarning, match="Already unmerged"):  # peft reached the real LoRA layers
        pipe.unfuse_lora()
    assert np.array_equal(_sample(pipe), before)


def test_unload_after_unrealign_gives_the_base_model(world):
    """Was: unload_lora_weights() while realigned was ignored, so the LoRA stayed on after unrealign."""
    pipe = _stock_lora_pipe(world["lora"])
    deradiff.realign(pipe, lam=0.5)
    with pytest.raises(DeradiffError):
        pipe.unload_lora_weights()
    deradiff.unrealign(pipe)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    assert np.array_equal(_sample(pipe), _sample(tiny_sd_pipeline()))


# --- 3. save_pretrained ----------------------------------------------------------------------------------
def test_save_pretrained_of_a_realigned_pipeline_saves_the_real_one(tmp_path):
    """Was: a module dump, `unet` re-registered as (None, None), and a folder without unet/."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline()
    deradiff.realign(pipe, lam=0.5, aligned_unet=tiny_sd_pipeline(seed=1).unet)
    pipe.save_pretrained(tmp_path / "saved")
    assert pipe.config["unet"] == ("diffusers", "UNet2DConditionModel")
    assert type(pipe.unet).__name__ == "RealignedDenoiser"  # still realigned
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(_sample(loaded), _sample(tiny_sd_pipeline()))  # the base, not the mixture


def test_save_pretrained_with_a_lora_writes_what_the_unrealigned_pipeline_writes(world, tmp_path):
    from safetensors.torch import load_file

    unet_file = Path("unet") / "diffusion_pytorch_model.safetensors"
    stock = _stock_lora_pipe(world["lora"])
    stock.save_pretrained(tmp_path / "stock")
    pipe = _stock_lora_pipe(world["lora"])
    deradiff.realign(pipe, lam=0.5)
    pipe.save_pretrained(tmp_path / "realigned")
    assert files_under(tmp_path / "realigned") == files_under(tmp_path / "stock")
    saved, expected = load_file(tmp_path / "realigned" / unet_file), load_file(tmp_path / "stock" / unet_file)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


# --- 4. non-finite LoRAs and images ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nan_lora", "inf_lora"])
def test_non_finite_lora_is_refused_at_load(world, tmp_path, capsys, kind):
    """Was: loaded, sampled NaN (black) images and exited 0."""
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, f"lora_dir={world[kind]}"), capsys)
    assert_one_line_error(code, err, str(world[kind] / LORA_FILE), "non-finite")
    assert files_under(out) == [] and not out.exists()


def test_non_finite_images_are_never_written(world, tmp_path, capsys):
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, f"lora_dir={world['diverging']}"), capsys)
    assert_one_line_error(code, err, "lambda 1 ", "non-finite")
    assert files_under(out) == []


def test_a_run_that_fails_midway_leaves_no_half_written_results(world, tmp_path, capsys, monkeypatch):
    """Prompt 0's images and grid are written, then prompt 1 fails: nothing of the run may remain."""
    from deradiff.realignment import stage

    def fail_on_second_prompt(images, lam, index, prompt):
        if index == 1:
            raise DeradiffError(f"lambda {lam:g} gave non-finite images (simulated)")

    monkeypatch.setattr(stage, "_check_finite", fail_on_second_prompt)
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, "prompts=[a red circle, a blue square]"), capsys)
    assert_one_line_error(code, err, "simulated")
    assert files_under(out) == []


# --- 5. missing LoRA folders -----------------------------------------------------------------------------
def test_a_deleted_lora_folder_is_named_as_missing(world, tmp_path, capsys):
    from deradiff.models.pipelines import check_lora_dir

    gone = tmp_path / "gone"
    shutil.copytree(world["lora"], gone)
    shutil.rmtree(gone)
    code, _, err = run_cli(realign_args(world, tmp_path / "samples", f"lora_dir={gone}"), capsys)
    assert_one_line_error(code, err, f"'{gone}' does not exist")
    no_meta = tmp_path / "no-meta"
    shutil.copytree(world["lora"], no_meta)
    (no_meta / "deradiff_metadata.json").unlink()
    check_lora_dir(no_meta)  # an existing folder without metadata is not "missing"


@pytest.mark.parametrize("kind, message", [
    ("a file", "is a file; expected a LoRA folder"),
    ("an empty folder", "has no pytorch_lora_weights.safetensors"),
    ("garbled metadata", "is not valid JSON"),
])
def test_a_lora_folder_that_cannot_load_is_refused_before_the_base_model_loads(world, tmp_path, capsys, kind, message):
    """Was: refused only after the base model had loaded, and a file was called 'does not exist'. The base
    model here does not exist, so any error about it would mean the LoRA was checked too late."""
    lora = tmp_path / "lora"
    if kind == "a file":
        lora.write_text("x")
    elif kind == "an empty folder":
        lora.mkdir()
    else:
        shutil.copytree(world["lora"], lora)
        (lora / "deradiff_metadata.json").write_text('{"beta": 0.')
    code, _, err = run_cli(realign_args(world, tmp_path / "samples", f"lora_dir={lora}",
                                        f"base_model={tmp_path / 'no-base'}"), capsys)
    assert_one_line_error(code, err, message)


# --- 6. the realign CLI's output folder ------------------------------------------------------------------
def test_a_second_run_into_a_locked_folder_is_refused_with_the_owner_named(world, tmp_path, capsys):
    """Was: two concurrent runs into one folder both succeeded and mixed their images."""
    from deradiff.lock import OutputDirLock

    out = tmp_path / "samples"
    with OutputDirLock(out):
        code, _, err = run_cli(realign_args(world, out), capsys)
        assert files_under(out) == [".deradiff.lock"]
        assert json.loads((out / ".deradiff.lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert_one_line_error(code, err, "in use by another run", f"pid {os.getpid()}")


def test_overwrite_after_an_interrupted_run_keeps_only_the_new_runs_files(world, tmp_path, capsys):
    """Was: stale images and grids of the interrupted run stayed beside the new, shorter manifest."""
    out = tmp_path / "samples"
    for stale in ("images/p000_lam0.25_seed7.png", "images/p003_lam2_seed0.png", "grids/p003.png"):
        (out / stale).parent.mkdir(parents=True, exist_ok=True)
        (out / stale).write_bytes(b"stale")
    (out / "notes.txt").write_text("the user's own file")
    code, _, err = run_cli(realign_args(world, out, "overwrite=true"), capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    expected = {r["file"] for r in rows} | {"grids/p000.png", "manifest.csv", "manifest.json", "config.yaml", "notes.txt"}
    assert set(files_under(out)) == expected and len(rows) == 2


def test_lambdas_that_round_alike_get_their_own_files(world, tmp_path, capsys):
    """Was: lambdas 0.1 and 0.1000001 were both written to p000_lam0.1_seed0.png; the manifest listed two."""
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, "lambdas=[0.1, 0.1000001, 2]"), capsys)
    assert code == 0, err
    files = [r["file"] for r in csv.DictReader(open(out / "manifest.csv"))]
    assert files == ["images/p000_lam0.1_seed0.png", "images/p000_lam0.1000001_seed0.png", "images/p000_lam2_seed0.png"]
    assert sorted(f for f in files_under(out) if f.startswith("images/")) == sorted(files)


@pytest.mark.parametrize("override, needles", [
    ("lambdas=[0.5, 1, 0.5]", ["'lambdas'", "lambdas[0]=0.5", "lambdas[2]=0.5"]),
    ("lambdas=[0.3, 0.30000000000000004]", ["'lambdas'", "0.3 ", "0.30000000000000004"]),
    ("seeds=[0, 1, 0]", ["'seeds'", "[0]", "more than once"]),
])
def test_duplicate_lambdas_and_seeds_are_refused_up_front(world, tmp_path, capsys, override, needles):
    out = tmp_path / "samples"
    code, _, err = run_cli(realign_args(world, out, override), capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["file", "dangling-link"])
def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_loading(world, tmp_path, capsys, kind):
    out = tmp_path / "samples"
    if kind == "file":
        out.write_text("not a folder")
    else:
        out.symlink_to(tmp_path / "nowhere")
    # the base model does not exist either: the output_dir error shows it was checked before any loading
    code, _, err = run_cli(realign_args(world, out, f"base_model={tmp_path / 'nobase'}"), capsys)
    assert_one_line_error(code, err, f"output_dir '{out}'")
    assert out.is_symlink() if kind == "dangling-link" else out.read_text() == "not a folder"


@pytest.mark.parametrize("beta", [-1.0, 0.0, float("nan"), float("inf"), True])
def test_realign_refuses_a_beta_that_is_not_a_kl_strength(beta):
    """Was: beta=-1 was accepted and effective_beta reported -1.0."""
    import peft

    import deradiff

    pipe = tiny_sd_pipeline()
    pipe.unet.add_adapter(peft.LoraConfig(r=1, target_modules=["to_q"]))
    with pytest.raises(DeradiffError, match="beta must be a positive number"):
        deradiff.realign(pipe, lam=1.0, beta=beta)


def test_gradient_checkpointing_reaches_the_real_denoiser(world):
    import deradiff
    from deradiff.models.pipelines import load_lora

    pipe = tiny_sd_pipeline()
    load_lora(pipe, world["lora"])
    unet = pipe.unet
    deradiff.realign(pipe, lam=0.5)
    pipe.unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    pipe.unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing
