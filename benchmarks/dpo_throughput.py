"""Diffusion-DPO training throughput: deradiff against a plain implementation, and where the gain comes from.

    python benchmarks/dpo_throughput.py                                # random tiny SD (deradiff.testing)
    python benchmarks/dpo_throughput.py --model tiny                   # the embedded tiny-world model
    python benchmarks/dpo_throughput.py --model sd15 --resolution 256 --pairs 1 --steps 1 --rounds 1  # CPU
    python benchmarks/dpo_throughput.py --model sd15 --device cuda --dtype bfloat16 --pairs 8          # GPU

One run, same model, data, LoRA and micro-batch for every row (pairs/s; the ladder's rows are interleaved
over `--rounds` rounds and the median is kept, because the machine may be shared):

  plain                   VAE + text encoder on every step, winner and loser in separate forwards,
                          reference = a second frozen UNet copy (the straightforward implementation)
  + cache                 latents and text embeddings encoded once, up front, into deradiff's on-disk cache
  + cache + fused         ... and winner + loser in ONE forward, for the policy and the reference
  + cache + fused + same-UNet ref
                          ... and the reference is the same UNet with its LoRA disabled (deradiff's step:
                          one UNet in memory instead of two)
  deradiff trainer        the real `deradiff train dpo` loop (`run_dpo`, cache on), whole-run rate
  deradiff trainer, no cache   the same with `data.cache_latents=false`
(The trainer rows run on CPU for the tiny models only: the trainer loads its model from a folder and picks
its own device; the sd15 model is built in memory. Their rate includes the first step. The trainer's step
is the ladder's last row.)

All ladder rows train the same LoRA (one policy UNet, one optimizer): throughput does not depend on the
weights' values, and sharing keeps an SD1.5-sized run to two UNets in memory. Gains are printed as ratios of
adjacent rows, so the shares of caching and of the fused batch are separate. The one-off cache build is
printed too: it is paid once per dataset, not per step. Target: deradiff / plain >= 1.3.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BETA = 5000.0


@dataclass(frozen=True)
class Variant:
    name: str
    cache: bool  # latents + text embeddings from the cache (else: encoded every step)
    fused: bool  # winner and loser in one forward (else: two)
    copy_ref: bool  # reference = a second frozen UNet (else: same UNet, adapter disabled)


LADDER = [
    Variant("plain", cache=False, fused=False, copy_ref=True),
    Variant("+ cache", cache=True, fused=False, copy_ref=True),
    Variant("+ cache + fused", cache=True, fused=True, copy_ref=True),
    Variant("+ cache + fused + same-UNet ref", cache=True, fused=True, copy_ref=False),
]
TRAINER_ROWS = ["deradiff trainer", "deradiff trainer, no cache"]


@dataclass
class Bench:
    """Everything the ladder's variants share."""

    pipe: Any
    ref: torch.nn.Module  # frozen copy of the base UNet (for the copy_ref variants)
    optimizer: torch.optim.Optimizer  # over the policy UNet's LoRA
    live: Any  # PairSource encoding on every access
    cached: Any  # PairSource reading the cache
    cache_build_s: float
    pairs: int
    device: torch.device
    dtype: torch.dtype


def build_pipeline(model: str, folder: Path) -> tuple[Any, str | None]:
    """(pipeline, its folder for the trainer rows or None). `folder`: where a random tiny model is saved."""
    from diffusers import DiffusionPipeline

    from deradiff.models.pipelines import resolve_base_model
    from deradiff.testing import sd15_sized_pipeline, tiny_sd_pipeline

    if model == "sd15":
        return sd15_sized_pipeline(), None
    if model == "tiny":
        base = resolve_base_model("tiny")
    else:
        tiny_sd_pipeline().save_pretrained(str(folder))
        base = str(folder)
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe, base


def setup(pipe: Any, data: str, args: argparse.Namespace, resolution: int, tmp: Path) -> Bench:
    from deradiff.data.cache import Encoder, LivePairs, build_cache
    from deradiff.data.pickapic import load_preference_pairs
    from deradiff.models.lora import attach_lora

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    for name in ("vae", "text_encoder", "unet"):
        getattr(pipe, name).requires_grad_(False).to(device, dtype)
    ref = copy.deepcopy(pipe.unet)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(attach_lora(pipe.unet, rank=4), lr=1e-4)
    dataset, _ = load_preference_pairs(data)
    encoder = Encoder(pipe, resolution, device, dtype)
    start = time.perf_counter()
    cached = build_cache(dataset, encoder, tmp / "cache", batch_size=args.pairs, progress=False)
    return Bench(pipe, ref, optimizer, LivePairs(dataset, encoder), cached, time.perf_counter() - start,
                 args.pairs, device, dtype)


def make_step(bench: Bench, variant: Variant) -> Callable[[int], None]:
    """One optimizer step of `variant` on micro-batch `i`."""
    from deradiff.losses.dpo import diffusion_dpo_loss
    from deradiff.models.lora import adapter_disabled

    unet, scheduler = bench.pipe.unet, bench.pipe.scheduler
    source, n = (bench.cached if variant.cache else bench.live), bench.pairs

    def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if variant.fused:
            return model(x, t, encoder_hidden_states=text).sample
        return torch.cat([model(x[h], t[h], encoder_hidden_states=text[h]).sample for h in (slice(0, n), slice(n, None))])

    def step(i: int) -> None:
        batch = source.get([(i * n + j) % len(source) for j in range(n)], bench.device)
        latents = torch.cat([batch["latents_w"], batch["latents_l"]])
        noise = torch.randn_like(batch["latents_w"]).repeat(2, 1, 1, 1)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=bench.device).repeat(2)
        x = scheduler.add_noise(latents, noise, t).to(bench.dtype)
        text = batch["prompt_embeds"].repeat(2, 1, 1).to(bench.dtype)
        prediction = forward(unet, x, t, text)
        with torch.no_grad():
            if variant.copy_ref:
                reference = forward(bench.ref, x, t, text)
            else:
                with adapter_disabled(unet) as base_unet:
                    reference = forward(base_unet, x, t, text)
        diffusion_dpo_loss(prediction, reference, noise, BETA).loss.backward()
        bench.optimizer.step()
        bench.optimizer.zero_grad()

    return step


def weights_held(bench: Bench, variant: Variant) -> int:
    modules = [bench.pipe.unet, bench.ref] if variant.copy_ref else [bench.pipe.unet]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ladder(bench: Bench, steps: int, rounds: int) -> dict[str, tuple[float, int]]:
    """name -> (median pairs/s over rounds, UNet weight bytes held); one warm-up step per variant."""
    built = {v.name: (make_step(bench, v), weights_held(bench, v)) for v in LADDER}
    rates: dict[str, list[float]] = {name: [] for name in built}
    for step, _ in built.values():
        step(0)
    for r in range(rounds):
        for name, (step, _) in built.items():
            synchronize(bench.device)
            start = time.perf_counter()
            for i in range(steps):
                step(1 + r * steps + i)
            synchronize(bench.device)
            rates[name].append(steps * bench.pairs / (time.perf_counter() - start))
    return {name: (statistics.median(rates[name]), built[name][1]) for name in built}


MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}  # --dtype -> train.mixed_precision


def trainer_rate(base: str, data: str, args: argparse.Namespace, resolution: int, steps: int, out: Path,
                 cache: bool) -> float:
    """Pairs/s of a whole `run_dpo` run (its rate includes the first step, which the ladder warms up)."""
    from deradiff.config import load_config
    from deradiff.training.config import DPOConfig
    from deradiff.training.dpo import run_dpo
    from deradiff.training.tracking import RecordingTracker

    overrides = [f"output_dir={out}", f"data.source={data}", f"model.pretrained={base}", "tracker.backend=none",
                 f"train.max_steps={steps}", f"train.micro_batch_size={args.pairs}", f"model.resolution={resolution}",
                 f"train.mixed_precision={MIXED_PRECISION[args.dtype]}",
                 f"data.cache_latents={str(cache).lower()}", f"data.cache_dir={out.parent / 'trainer-cache'}"]
    return run_dpo(load_config(DPOConfig, None, overrides), tracker=RecordingTracker())["pairs_per_s"]


def report(rows: dict[str, tuple[float, int]], cache_build_s: float) -> str:
    plain = rows["plain"][0]
    lines = ["| variant | pairs/s | vs plain | vs row above | UNet weights held (MB) |", "|---|---|---|---|---|"]
    previous = None
    for name, (rate, held) in rows.items():
        in_ladder = name not in TRAINER_ROWS  # the trainer holds what the ladder's last row holds
        gain = f"{rate / previous:.2f}x" if previous and in_ladder else "-"
        held_mb = f"{held / 2**20:.1f}" if in_ladder else "-"
        lines.append(f"| {name} | {rate:.3g} | {rate / plain:.2f}x | {gain} | {held_mb} |")
        previous = rate
    lines.append(f"\none-off cache build for the whole dataset: {cache_build_s:.2f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny-random", "tiny", "sd15"], default="tiny-random",
                        help="random tiny SD, the embedded tiny-world model, or SD1.5-sized random weights")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's native one)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (micro-batch)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="frozen weights (UNet, VAE, text encoder); the LoRA trains in float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, int]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from deradiff.testing import write_pairs

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pipe, base = build_pipeline(args.model, tmp / "base")
        native = 2 ** (len(pipe.vae.config.block_out_channels) - 1) * pipe.unet.config.sample_size
        resolution = args.resolution or native
        data = write_pairs(tmp / "pairs.parquet", max(args.pairs * 4, 16), size=resolution)
        bench = setup(pipe, data, args, resolution, tmp)
        rows, cache_build_s = ladder(bench, args.steps, args.rounds), bench.cache_build_s
        del bench, pipe  # free the ladder's models before the trainer loads its own
        if base is not None and args.device == "cpu":
            trainer_steps = 1 + args.steps * args.rounds
            for name, cache in zip(TRAINER_ROWS, (True, False)):
                rows[name] = (trainer_rate(base, data, args, resolution, trainer_steps, tmp / f"run-{cache}", cache), 0)
    print(f"model: {args.model} at {resolution} px, {args.pairs} pairs per step, {args.device} {args.dtype}, "
          f"torch {torch.__version__}, {args.threads} CPU thread(s)")
    print(report(rows, cache_build_s))
    return rows


if __name__ == "__main__":
    main()
