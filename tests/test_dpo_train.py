"""Diffusion-DPO end to end on tiny random SD / SDXL models: trains, saves a stock-loadable LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deradiff.config import load_config
from deradiff.errors import DeradiffError
from deradiff.training.config import DPOConfig
from deradiff.training.dpo import run_dpo
from deradiff.training.tracking import RecordingTracker
from deradiff.testing import save_tiny_base, write_pairs

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, base, data, *extra):
    return load_config(DPOConfig, None, [
        f"output_dir={tmp_path / 'run'}", f"data.source={data}", f"model.pretrained={base}", "tracker.backend=none",
        "train.max_steps=3", "train.micro_batch_size=2", "train.gradient_accumulation_steps=2",
        "dpo.beta=5000", "optim.lr=1e-2", *extra,
    ])


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_dpo_trains_and_lora_loads_in_stock_pipeline(tmp_path, sdxl):
    from diffusers import DiffusionPipeline

    base = save_tiny_base(tmp_path / "base", sdxl=sdxl)
    data = write_pairs(tmp_path / "pairs.parquet", 8)
    rec = RecordingTracker()
    summary = run_dpo(_cfg(tmp_path, base, data), tracker=rec)
    assert summary["steps_run"] == 3 and summary["effective_batch_size"] == 4
    losses = rec.series("loss")
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # LoRA starts at the reference: margin 0
    assert rec.series("implicit_acc") and rec.series("reward_margin")[-1] != 0.0
    meta = json.loads((tmp_path / "run" / "lora" / "deradiff_metadata.json").read_text())
    assert meta["method"] == "dpo" and meta["beta"] == 5000 and meta["loss_type"] == "sigmoid"
    assert meta["steps"] == 3 and meta["data_pairs"] == 8 and len(meta["data_fingerprint"]) == 16

    pipe = DiffusionPipeline.from_pretrained(base)
    x = torch.randn(1, 4, 8, 8)
    kw = {}
    text = torch.randn(1, 16, pipe.unet.config.cross_attention_dim)
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    before = pipe.unet(x, 500, text, **kw).sample
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))  # stock diffusers loader
    after = pipe.unet(x, 500, text, **kw).sample
    assert not torch.allclose(before, after)


def test_too_little_data_and_8bit_adam_errors(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    data = write_pairs(tmp_path / "pairs.parquet", 3)
    with pytest.raises(DeradiffError, match="fewer than one global micro-batch"):
        run_dpo(_cfg(tmp_path, base, data, "train.micro_batch_size=4"), tracker=RecordingTracker())
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(DeradiffError, match="pip install bitsandbytes"):
            run_dpo(_cfg(tmp_path / "b", base, data, "optim.use_8bit_adam=true"), tracker=RecordingTracker())


@pytest.mark.parametrize("name", ["tiny", "sd15", "sdxl"])
def test_shipped_configs_load(name):
    cfg = load_config(DPOConfig, REPO / "configs" / name / "dpo.yaml")
    if name != "tiny":
        assert cfg.dpo.beta == 5000 and cfg.train.gradient_accumulation_steps == 128


def test_cli_help_lists_dpo(capsys):
    from deradiff.cli import main

    with pytest.raises(SystemExit):
        main(["train", "dpo", "--help"])
    assert "dpo.beta" in capsys.readouterr().out


@pytest.mark.parametrize("options", [
    ("train.gradient_checkpointing=true",),
    ("train.mixed_precision=bf16",),
    ("model.prediction_type=v_prediction",),
], ids=["grad-checkpointing", "bf16", "v-prediction"])
def test_speed_and_target_options_train(tmp_path, options):
    """Each option runs end to end on CPU and still learns (a LoRA that differs from its zero init)."""
    base = save_tiny_base(tmp_path / "base")
    data = write_pairs(tmp_path / "pairs.parquet", 8)
    rec = RecordingTracker()
    summary = run_dpo(_cfg(tmp_path, base, data, *options), tracker=rec)
    assert summary["steps_run"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in rec.series("loss"))
    meta = json.loads((tmp_path / "run" / "lora" / "deradiff_metadata.json").read_text())
    if "v_prediction" in options[0]:
        assert meta["prediction_type"] == "v_prediction"
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k or "lora.up" in k)
