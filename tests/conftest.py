"""Shared pytest fixtures (keep small: each one is used by several test files)."""

from __future__ import annotations

import pytest


def _add_test_lora(model, seed: int = 1):
    """Attach a non-trivial (randomly initialised) peft LoRA to a tiny UNet, like a trained one would be."""
    import peft
    import torch

    torch.manual_seed(seed)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    return model


@pytest.fixture
def lora_sd_pipe():
    """A tiny random StableDiffusionPipeline whose UNet carries a random LoRA adapter."""
    from deradiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    _add_test_lora(pipe.unet)
    return pipe


@pytest.fixture
def lora_sdxl_pipe():
    """A tiny random StableDiffusionXLPipeline whose UNet carries a random LoRA adapter."""
    from deradiff.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    _add_test_lora(pipe.unet)
    return pipe


@pytest.fixture
def add_lora():
    """`add_lora(unet, seed=1)`: attach a random LoRA adapter to a UNet (returns the UNet)."""
    return _add_test_lora


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """A saved tiny random SD pipeline folder (model.pretrained for trainer tests)."""
    from deradiff.testing import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs with one torch thread: tiny models are ~10x slower with 2 threads on a busy 2-core
    machine. (Multi-process tests start their own interpreters and set threads themselves.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
