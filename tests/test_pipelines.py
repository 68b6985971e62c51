"""load_pipeline / load_lora / read_lora_metadata: round trips on a tiny saved model and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict

from deradiff.errors import DeradiffError
from deradiff.models.pipelines import load_lora, load_pipeline, read_lora_metadata


@pytest.fixture
def saved(tmp_path, lora_sd_pipe):
    """(base folder, LoRA folder) written by stock diffusers from a tiny SD pipeline with a LoRA."""
    from deradiff.testing import tiny_sd_pipeline

    base, lora = tmp_path / "base", tmp_path / "lora"
    tiny_sd_pipeline().save_pretrained(base)  # same seed: the base weights under lora_sd_pipe's adapter
    StableDiffusionPipeline.save_lora_weights(lora, unet_lora_layers=get_peft_model_state_dict(lora_sd_pipe.unet))
    return base, lora


def test_load_pipeline_and_lora_round_trip(saved):
    base, lora = saved
    (lora / "deradiff_metadata.json").write_text(json.dumps({"base_model": str(base), "method": "dpo", "beta": 0.1}))
    pipe = load_pipeline(base)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    meta = load_lora(pipe, lora)
    assert meta == {"base_model": str(base), "method": "dpo", "beta": 0.1}
    assert pipe.unet.peft_config  # an adapter is attached
    import deradiff

    handle = deradiff.realign(pipe, lam=0.5)
    assert handle.beta == 0.1 and handle.effective_beta == pytest.approx(0.2)  # beta from the metadata


def test_missing_or_non_diffusers_base(tmp_path):
    with pytest.raises(DeradiffError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(DeradiffError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_lora_errors(tmp_path, saved):
    base, lora = saved
    pipe = load_pipeline(base)
    with pytest.raises(DeradiffError, match="does not exist"):
        load_lora(pipe, tmp_path / "missing")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_lora_weights.bin").write_bytes(b"not loaded")
    with pytest.raises(DeradiffError, match="pickle.*safetensors only"):
        load_lora(pipe, pickled)


def test_lora_for_other_architecture(saved):
    from deradiff.testing import tiny_sdxl_pipeline

    with pytest.raises(DeradiffError, match="trained for a different architecture"):
        load_lora(tiny_sdxl_pipeline(), saved[1])


def test_read_lora_metadata(tmp_path):
    assert read_lora_metadata(tmp_path) is None
    (tmp_path / "deradiff_metadata.json").write_text("{not json")
    with pytest.raises(DeradiffError, match="not valid JSON"):
        read_lora_metadata(tmp_path)
    (tmp_path / "deradiff_metadata.json").write_text(json.dumps({"beta": -1}))
    with pytest.raises(DeradiffError, match="beta must be a positive number"):
        read_lora_metadata(tmp_path)
    (tmp_path / "deradiff_metadata.json").write_text(json.dumps({"base_model": "x", "method": "dpo", "beta": 500}))
    assert read_lora_metadata(tmp_path)["beta"] == 500


def test_lora_loaded_pipeline_matches_original_lora(saved, lora_sd_pipe):
    """The LoRA we load reproduces the in-memory adapter's predictions (weights really round-trip)."""
    base, lora = saved
    pipe = load_pipeline(base)
    load_lora(pipe, lora)
    lora_sd_pipe.unet.enable_adapters()
    x, t, emb = torch.randn(1, 4, 8, 8), 500, torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, emb).sample, lora_sd_pipe.unet(x, t, emb).sample)


def test_saved_lora_is_readable_like_any_file_the_user_writes(tmp_path, lora_sd_pipe):
    """The LoRA folder and its files follow the umask (not mkdtemp's 0700 or the safetensors writer's 0600),
    so teammates on a shared cluster can load a finished adapter. (Every `atomic_path` write and the latent
    cache's shards go through the same `match_umask`.)"""
    import os
    import stat

    from deradiff.models.lora import save_lora

    old = os.umask(0o022)
    try:
        out = save_lora(lora_sd_pipe.unet, tmp_path / "lora", {"base_model": "x"})
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == mode(tmp_path / "plain") == 0o755
    assert {f.name: mode(f) for f in out.iterdir()} == {f.name: 0o644 for f in out.iterdir()}
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "deradiff_metadata.json", "pytorch_lora_weights.safetensors"]


def test_atomic_writes_and_cache_shards_follow_the_umask(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from deradiff.data.cache import _write_shard
    from deradiff.fileio import atomic_path

    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "samples.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        name = _write_shard(tmp_path, 0, [{"latents": torch.zeros(1, 4)}])
    finally:
        os.umask(old)
    for file in (tmp_path / "samples.safetensors", tmp_path / name):
        assert stat.S_IMODE(file.stat().st_mode) == 0o640, file
