"""Pairs/s of deradiff's Diffusion-DPO step vs a plain reference implementation, same model and batch.

deradiff: latents + text embeddings from the on-disk cache, reference = same UNet with the LoRA disabled,
winner+loser in one forward. Plain: a second frozen UNet copy as reference, VAE + text encoder run on
every step (no caching), winner and loser in separate forwards. Prints both rates and their ratio.

    python benchmarks/dpo_throughput.py [--base tiny|FOLDER] [--pairs 8] [--steps 5] [--resolution R]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.test_dpo_helpers


def _setup(base: str | None, tmp: Path, pairs: int):
    from deradiff.testing import tiny_sd_pipeline
    from tests.test_dpo_helpers import write_pairs  # synthetic Pick-a-Pic parquet

    if base is None:
        tiny_sd_pipeline().save_pretrained(str(tmp / "base"))
        base = str(tmp / "base")
    return base, write_pairs(tmp / "pairs.parquet", max(pairs * 2, 8))


def deradiff_rate(base: str, data: str, pairs: int, steps: int, out: Path) -> float:
    from deradiff.config import load_config
    from deradiff.training.dpo import DPOConfig, run_dpo
    from deradiff.training.tracking import RecordingTracker

    cfg = load_config(DPOConfig, None, [f"output_dir={out}", f"data.source={data}", f"model.pretrained={base}",
                                        "tracker.backend=none", f"train.max_steps={steps}",
                                        f"train.micro_batch_size={pairs}", "data.cache_latents=true"])
    return run_dpo(cfg, tracker=RecordingTracker())["pairs_per_s"]


def plain_rate(base: str, data: str, pairs: int, steps: int) -> float:
    """The straightforward implementation: two UNets, encode everything each step, two forwards per pass."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiffusionPipeline
    from peft import LoraConfig

    from deradiff.data.cache import preprocess
    from deradiff.data.pickapic import decode_image, load_preference_pairs

    pipe = DiffusionPipeline.from_pretrained(base)
    ds, _ = load_preference_pairs(data)
    ref_unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet = pipe.unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    res = 2 ** (len(pipe.vae.config.block_out_channels) - 1) * pipe.unet.config.sample_size

    def encode(images):
        x = torch.stack([preprocess(decode_image(b), res)[0] for b in images])
        with torch.no_grad():
            return pipe.vae.encode(x).latent_dist.sample() * pipe.vae.config.scaling_factor

    def step(i):
        rows = ds[[(i * pairs + j) % len(ds) for j in range(pairs)]]
        with torch.no_grad():
            text = pipe.encode_prompt(rows["caption"], "cpu", 1, False)[0]
        lw, ll = encode(rows["jpg_w"]), encode(rows["jpg_l"])
        noise, t = torch.randn_like(lw), torch.randint(0, 1000, (pairs,))
        mse = {}
        for name, lat in (("w", lw), ("l", ll)):
            noisy = sched.add_noise(lat, noise, t)
            mse[name] = F.mse_loss(unet(noisy, t, text).sample, noise, reduction="none").flatten(1).mean(1)
            with torch.no_grad():
                mse["r" + name] = F.mse_loss(ref_unet(noisy, t, text).sample, noise, reduction="none").flatten(1).mean(1)
        inside = -2500 * ((mse["w"] - mse["l"]) - (mse["rw"] - mse["rl"]))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    step(0)  # warm-up, like the trainer's first step
    t0 = time.perf_counter()
    for i in range(1, steps):
        step(i)
    return (steps - 1) * pairs / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="diffusers folder ('tiny' = embedded world; default: random tiny SD)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (micro-batch)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps timed")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = args.base
        if base == "tiny":
            from deradiff.training.dpo import resolve_base_model

            base = resolve_base_model("tiny")
        base, data = _setup(base, tmp, args.pairs)
        ours = deradiff_rate(base, data, args.pairs, args.steps, tmp / "run")
        plain = plain_rate(base, data, args.pairs, args.steps)
    print(f"deradiff: {ours:.2f} pairs/s   plain (2nd UNet, no cache, 2 forwards): {plain:.2f} pairs/s   "
          f"ratio: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
