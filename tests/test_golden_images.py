"""Realigned and eval images for fixed configs and seeds, against hashes stored before the sampling-core refactor.

Images are quantized to 8 bits before hashing (what a user sees); DDPO latents and log-probs are rounded to 4
decimals. Path KLs are stored as numbers and compared to a relative 1e-5: a realigned model's path KL now reuses
its reference branch, which can come from a stacked forward whose rounding differs from a separate base call.
Regenerate (only when a change is *meant* to alter samples, and say so in the commit):
DERADIFF_WRITE_GOLDEN=1 pytest tests/test_golden_images.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "golden" / "image_hashes.json"
PROMPTS = ["a red circle", "a blue square"]
SEEDS = [0, 1]
PIPE_KW = {"num_inference_steps": 4, "guidance_scale": 3.0, "eta": 1.0, "output_type": "np"}


def _digest(*arrays: object) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]


def _images(x: object) -> np.ndarray:
    """[0, 1] floats (tensor NCHW or array NHWC) as 8-bit pixels."""
    array = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)


def _numbers(x: torch.Tensor) -> np.ndarray:
    return np.round(x.detach().double().cpu().numpy(), 4) + 0.0  # + 0.0: -0.0 and 0.0 hash alike


def _check(name: str, digest: str, path_kl: torch.Tensor | None = None) -> None:
    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("DERADIFF_WRITE_GOLDEN"):
        stored[name] = digest
        if path_kl is not None:
            stored[f"{name}_path_kl"] = [round(float(v), 6) for v in path_kl.flatten()]
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")
        return
    assert name in stored, f"no stored hash for {name}; see this file's docstring"
    assert digest == stored[name], f"{name}: the samples changed"
    if path_kl is not None:
        expected = torch.tensor(stored[f"{name}_path_kl"], dtype=torch.float64)
        torch.testing.assert_close(path_kl.double().flatten(), expected, rtol=1e-5, atol=1e-5)


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for _ in PROMPTS for s in SEEDS]


@pytest.mark.parametrize("branches", ["stacked", "two-call"])
def test_realigned_pipeline_images(lora_sd_pipe, branches):
    import deradiff
    from diffusers import DDIMScheduler

    pipe = lora_sd_pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    deradiff.realign(pipe, lam=0.5, branches=branches)
    half = pipe(PROMPTS, num_images_per_prompt=len(SEEDS), generator=_generators(), **PIPE_KW).images
    deradiff.realign(pipe, lam=[2.0, 1.5, 1.0, 0.0])
    scheduled = pipe(PROMPTS, num_images_per_prompt=len(SEEDS), generator=_generators(), **PIPE_KW).images
    _check(f"realign_sd_{branches}", _digest(_images(half), _images(scheduled)))


def test_realigned_sdxl_images(lora_sdxl_pipe):
    import deradiff

    deradiff.realign(lora_sdxl_pipe, lam=1.5)
    images = lora_sdxl_pipe(PROMPTS, num_images_per_prompt=len(SEEDS), generator=_generators(), **PIPE_KW).images
    _check("realign_sdxl", _digest(_images(images)))


def test_sweep_images(lora_sd_pipe):
    from deradiff.realignment.sweep import sweep

    result = sweep(lora_sd_pipe, PROMPTS, SEEDS, [0.0, 0.5, 1.0, 2.0], **PIPE_KW)
    _check("sweep_sd", _digest(_images(np.stack([np.stack([np.stack(p) for p in k]) for k in result.images]))))


def _eval_settings(**kw: object):
    from deradiff.eval.sampler import SampleSettings

    return SampleSettings(steps=4, eta=1.0, guidance_scale=3.0, **kw)


@pytest.mark.parametrize("pipe_name", ["lora_sd_pipe", "lora_sdxl_pipe"])
def test_eval_variant_images_and_path_kl(pipe_name, request):
    from deradiff.eval.generate import make_jobs, sample_variant
    from deradiff.eval.variants import Variant

    pipe = request.getfixturevalue(pipe_name)
    jobs = make_jobs(PROMPTS, SEEDS)
    variants = [Variant("base", "base", "l", "dpo", None), Variant("retrained", "retrained", "l", "dpo", 0.1),
                Variant("realigned", "realigned", "l", "dpo", 0.1, lam=0.5),
                Variant("realigned2", "realigned", "l", "dpo", 0.1, lam=2.0),
                Variant("scaled", "weight_scaled", "l", "dpo", 0.1, lam=0.5)]
    for variant in variants:
        out = sample_variant(pipe, variant, jobs, _eval_settings(), batch_size=3)
        _check(f"eval_{pipe_name}_{variant.name}", _digest(_images(out.images)), out.path_kl)


def test_tune_lambda_batch_images_and_path_kl(lora_sd_pipe):
    from deradiff.eval.generate import make_jobs
    from deradiff.eval.generate import sample_lambdas

    out = sample_lambdas(lora_sd_pipe, [0.0, 0.5, 1.0, 2.0], make_jobs(PROMPTS, SEEDS), _eval_settings(), batch_size=8)
    _check("tune_sd", _digest(*[_images(v.images) for v in out.values()]), torch.stack([v.path_kl for v in out.values()]))


def test_ddpo_rollout_latents_and_log_probs(lora_sd_pipe):
    from deradiff.models.lora import adapter_disabled
    from deradiff.sampling.conditions import encode
    from deradiff.sampling.ddim import ddim_scheduler
    from deradiff.sampling.rollout import sample_with_logprob

    pipe = lora_sd_pipe
    conditions = encode(pipe, PROMPTS, 3.0, (16, 16), "cpu")
    traj = sample_with_logprob(pipe.unet, ddim_scheduler(pipe.scheduler.config, 4), conditions, num_steps=4, eta=1.0,
                               guidance_scale=3.0, latent_shape=(4, 8, 8), generator=torch.Generator().manual_seed(0),
                               reference=lambda: adapter_disabled(pipe.unet))
    _check("ddpo_rollout_sd", _digest(_numbers(traj.latents), _numbers(traj.log_probs), _numbers(traj.kl)))
