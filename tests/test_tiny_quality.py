"""The shipped tiny model: loads with plain diffusers, meets the fidelity thresholds, and is reproducible by
`deradiff tiny pretrain` (run end to end here on a tiny budget)."""

import json
from pathlib import Path

import numpy as np
import pytest

from deradiff.world import TINY_MODEL_DIR, load_prompts
from deradiff.world.classifier import evaluate_classifier, load_classifier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_plain_sd_format(shipped_pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(shipped_pipe.unet, UNet2DConditionModel) and isinstance(shipped_pipe.vae, AutoencoderKL)
    assert isinstance(shipped_pipe.text_encoder, CLIPTextModel) and isinstance(shipped_pipe.tokenizer, CLIPTokenizer)
    assert shipped_pipe.safety_checker is None and shipped_pipe.scheduler.config.prediction_type == "epsilon"
    assert shipped_pipe.tokenizer.model_max_length == 16
    files = [p for p in Path(TINY_MODEL_DIR).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert (Path(TINY_MODEL_DIR) / "tokenizer" / "vocab.json").is_file()


def test_shipped_classifier_reads_clean_renders():
    acc = evaluate_classifier(load_classifier(), n=256, seed=123)
    assert min(acc.values()) >= 0.95, acc


@pytest.mark.slow  # ~8 s; the shipped model's measured quality (README figures)
def test_quality_on_held_out_eval_prompts(shipped_pipe):
    from deradiff.world.quality import measure_quality

    prompts = load_prompts("eval")
    chosen = [prompts[i % len(prompts)] for i in range(32)]
    result = measure_quality(shipped_pipe, chosen, list(range(32)), num_inference_steps=20, progress=False)
    assert result["colour_acc"] >= 0.9 and result["shape_acc"] >= 0.7, result


def test_fidelity_reward_prefers_matching_prompt():
    from deradiff.rewards import get_reward
    from deradiff.world import parse_prompt, render
    from deradiff.world.render import to_tensor

    image = to_tensor([render(parse_prompt("a large blue circle"), np.random.default_rng(0))])
    reward = get_reward("fidelity")
    right = reward(image, ["a large blue circle"])
    wrong = [reward(image, [p]) for p in ("a large red circle", "a large blue square", "a small blue circle")]
    assert right.item() > 0.8 and all(w.item() < 0.2 for w in wrong)


@pytest.mark.slow  # ~7 s (a short pretrain)
def test_pretrain_and_quality_commands_end_to_end(tmp_path):
    from deradiff.cli import main

    out = tmp_path / "pre"
    rc = main(["tiny", "pretrain", "--config", str(REPO / "configs/tiny/pretrain.yaml"), f"output_dir={out}",
               "classifier.steps=3", "vae.steps=3", "unet.steps=3", "unet.dataset_size=32", "quality_images=2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["quality"]) >= {"colour_acc", "shape_acc", "size_acc"}
    assert (out / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "classifier.safetensors").is_file() and (out / "classifier.json").is_file()
    rc = main(["tiny", "quality", f"output_dir={tmp_path / 'q'}", f"model_dir={out / 'tiny-sd'}",
               f"classifier_dir={out}", "num_images=2", "num_inference_steps=2"])
    assert rc == 0 and json.loads((tmp_path / "q" / "quality.json").read_text())["n"] == 2


def test_quality_command_rejects_bad_model_dir(tmp_path, capsys):
    from deradiff.cli import main

    assert main(["tiny", "quality", f"model_dir={tmp_path}", f"output_dir={tmp_path}"]) == 2
    assert "model_index.json" in capsys.readouterr().err
