"""Pretrain the tiny world from scratch: fidelity classifier, VAE, then UNet + text encoder on latents.

Run by `deradiff tiny pretrain`. Deterministic from `seed` (single process, fixed torch/numpy generators).
The VAE is trained first and frozen, the dataset is encoded once, and the UNet and text encoder are trained
jointly on cached latents, which is what keeps the full run short on a CPU (timings: docs/configs.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deradiff.config import save_config
from deradiff.fileio import check_output_dir, check_results_absent, remove_outputs
from deradiff.lock import OutputDirLock
from deradiff.world.classifier import CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, save_classifier, train_classifier
from deradiff.world.config import PretrainConfig, UnetTrainConfig, VaeTrainConfig
from deradiff.world.model import (assemble_pipeline, build_scheduler, build_text_encoder, build_unet, build_vae,
                                  save_pipeline)
from deradiff.world.optim import adamw_one_cycle
from deradiff.world.promptset import load_prompts
from deradiff.world.render import render_batch
from deradiff.world.spec import parse_prompt
from deradiff.world.tokenizer import build_tokenizer

# What a run writes into output_dir, in the order an overwrite removes them: the file written last (the mark
# of a finished run) first, so an interrupted removal never leaves it beside missing files.
OUTPUTS = ("pretrain_config.yaml", "summary.json", "tiny-sd", CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG)
STAGING_PREFIX = ".pretrain.tmp-"


def render_dataset(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """`n` training images, each drawn for a uniformly chosen train prompt (its caption)."""
    prompts = load_prompts("train")
    captions = [prompts[int(i)] for i in rng.integers(len(prompts), size=n)]
    images, _ = render_batch([parse_prompt(c) for c in tqdm(captions, desc="render", unit="img")], rng)
    return images, captions


def train_vae(images: torch.Tensor, cfg: VaeTrainConfig, gen: torch.Generator):
    """Fit the AutoencoderKL, then set its scaling_factor to 1/std of the latents (as SD does)."""
    vae = build_vae()
    opt, sched = adamw_one_cycle(vae.parameters(), cfg.lr, cfg.steps, warmup_frac=0.05)
    bar = tqdm(range(cfg.steps), desc="vae", unit="step")
    for _ in bar:
        x = images[torch.randint(len(images), (cfg.batch_size,), generator=gen)] * 2 - 1
        post = vae.encode(x).latent_dist
        # Decode the posterior mean, not a posterior sample (why: docs/configs.md); the tiny KL term still
        # regularises the latents.
        recon = vae.decode(post.mode()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval().requires_grad_(False)
    latents = encode_images(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor, float(mse.item())


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled posterior means for all images (the KL weight is tiny, so the posterior is near-deterministic)."""
    chunks = [vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(chunks)


def train_unet(latents: torch.Tensor, captions: list[str], tokenizer, cfg: UnetTrainConfig,
               gen: torch.Generator):
    """Epsilon-prediction training of UNet + text encoder, with empty-caption dropout for CFG."""
    unet, text_encoder, scheduler = build_unet(latents.shape[-1]), build_text_encoder(tokenizer), build_scheduler()
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt, sched = adamw_one_cycle(params, cfg.lr, cfg.steps, warmup_frac=0.05)
    ema = _Ema(params, cfg.ema_decay)
    bar = tqdm(range(cfg.steps), desc="unet", unit="step")
    for _ in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        z0, tok = latents[idx], ids[idx].clone()
        tok[torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout] = empty[0]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, text_encoder(tok)[0]).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(scheduler.alphas_cumprod[t], cfg.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(params)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), float(loss.item())


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Epsilon-loss weight min(SNR, gamma)/SNR: stops the many easy low-noise steps dominating the gradient."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


class _Ema:
    """Exponential moving average of parameters (short runs sample much better from averaged weights)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params] if decay > 0 else []

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter]) -> None:
        if self.shadow:
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for shadow, p in zip(self.shadow, params):
            p.copy_(shadow)


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train everything, save into cfg.output_dir, measure quality on eval prompts; returns the summary.

    Refusals (an output_dir that cannot be a folder, earlier results without overwrite, another live run) come
    before any training. Files are written into a hidden staging folder and moved in only once all are done,
    so a failed or killed run never leaves a half-built world, nor destroys the one it was to replace."""
    out = check_output_dir(cfg.output_dir)
    check_results_absent(out, OUTPUTS, cfg.overwrite)
    with OutputDirLock(out):
        check_results_absent(out, OUTPUTS, cfg.overwrite)  # again: another run may have finished into it meanwhile
        _remove_stale_staging(out)
        stage = out / f"{STAGING_PREFIX}{os.getpid()}"
        try:
            summary = _train_into(cfg, stage)
            _publish(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return summary


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of killed runs: while this run holds the lock, no live run owns any of them."""
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _publish(stage: Path, out: Path) -> None:
    """Replace the earlier run's files (all of them: an overwrite removes what it replaces) with the new ones;
    pretrain_config.yaml, the mark of a finished run, is moved in last."""
    remove_outputs(out, OUTPUTS)
    for name in reversed(OUTPUTS):
        os.replace(stage / name, out / name)


def _train_into(cfg: PretrainConfig, out: Path) -> dict:
    """Train everything and write every file of OUTPUTS into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    summary: dict = {"seed": cfg.seed}
    t0 = time.perf_counter()
    classifier, summary["classifier_acc"] = train_classifier(cfg.classifier.steps, cfg.classifier.batch_size,
                                                             cfg.classifier.lr, cfg.seed)
    save_classifier(classifier, out)
    summary["classifier_s"] = time.perf_counter() - t0
    images, captions = render_dataset(cfg.unet.dataset_size, rng)
    t1 = time.perf_counter()
    vae, latents, summary["vae_mse"] = train_vae(images, cfg.vae, gen)
    summary["vae_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        tokenizer = build_tokenizer(tokenizer_dir)
        unet, text_encoder, summary["unet_loss"] = train_unet(latents, captions, tokenizer, cfg.unet, gen)
        summary["unet_s"] = time.perf_counter() - t2
        save_pipeline(assemble_pipeline(vae, text_encoder, tokenizer, unet), out / "tiny-sd", tokenizer_dir)
    summary["train_s"] = time.perf_counter() - t0
    if cfg.quality_images > 0:
        summary["quality"] = _closing_quality(out, cfg.quality_images)
    summary["total_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_config(dataclasses.replace(cfg, overwrite=False), out / "pretrain_config.yaml")  # rerunning it never replaces
    return summary


def _closing_quality(out: Path, n: int) -> dict:
    """Reload the saved pipeline (proves it round-trips) and judge eval-prompt samples."""
    from deradiff.world.classifier import load_classifier
    from deradiff.world.model import load_tiny_pipeline
    from deradiff.world.quality import measure_quality

    prompts = load_prompts("eval")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    return measure_quality(load_tiny_pipeline(out / "tiny-sd"), chosen, list(range(n)), classifier=load_classifier(out))
