"""Every trained LoRA folder carries a model card the hub can read, whose realign lines run as written."""

from __future__ import annotations

import re

import torch
from huggingface_hub import ModelCard

import deradiff
from deradiff.models.card import model_card
from deradiff.models.lora import save_lora
from deradiff.models.pipelines import load_lora


def test_card_front_matter_and_the_realign_lines_work(lora_sd_pipe, tmp_path):
    folder = save_lora(lora_sd_pipe.unet, tmp_path / "lora", {"base_model": "tiny", "method": "reward_grad",
                                                                 "beta": 0.08, "beta_units": "reward",
                                                                 "reward": "vividness", "steps": 32, "seed": 0})
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "tiny" and card.data.library_name == "diffusers"
    assert card.data.license == "apache-2.0"
    assert {"lora", "deradiff", "reward_grad", "stable-diffusion"} <= set(card.data.tags)
    assert "| beta (KL strength) | 0.08 |" in card.text and "reward `vividness`" in card.text
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    pipe = lora_sd_pipe
    pipe.unet.delete_adapters("default")  # the card's first line loads the LoRA onto the base pipeline
    exec(code.replace("path/to/this/folder", str(folder)), {"deradiff": deradiff, "pipe": pipe})
    handle = deradiff.realign(pipe, lam=0.5)
    assert handle.effective_beta == 0.16  # beta came from the metadata load_lora read
    assert torch.isfinite(pipe("x", num_inference_steps=2, output_type="latent").images).all()


def test_card_is_deterministic_and_names_unknown_licenses_other():
    meta = {"base_model": "my/own-model", "method": "dpo", "beta": 500.0, "data_fingerprint": "abc" * 10,
            "pipeline_class": "StableDiffusionXLPipeline"}
    text = model_card(meta)
    assert text == model_card(dict(meta))
    assert "license: other" in text and "- stable-diffusion-xl" in text and "preference pairs" in text
    assert "lam=0.5)  # behaves like a LoRA trained at beta = 500 / 0.5" in text


def test_load_lora_reads_a_folder_with_a_card(lora_sd_pipe, tmp_path):
    folder = save_lora(lora_sd_pipe.unet, tmp_path / "lora", {"base_model": "x", "beta": 0.1})
    lora_sd_pipe.unet.delete_adapters("default")
    assert load_lora(lora_sd_pipe, folder)["beta"] == 0.1
