"""Eval cost of a realigned model against a retrained one: both need two forwards per step (reference + aligned,
against model + base), so they should cost about the same.

    python benchmarks/eval_cost.py                       # embedded tiny model, the tiny eval's sampler
    python benchmarks/eval_cost.py --repeats 7 --batch 24

Variants, all on one pipeline and interleaved per repeat (the machine is shared: compare ratios, not seconds);
each samples the same (prompt, seed) jobs with the eval's shared-noise loop and measures the path KL to base:
  retrained            the LoRA model, plus the base (adapter off) for the path KL
  realigned            lambda 0.5: the reference branch is the base prediction, reused for the path KL
  realigned+base call  lambda 0.5 through the drop-in denoiser, plus a separate base call for the path KL
                       (how the eval computed it before the sampling core; shows what the reuse saves)
Wall time of the whole batch (model, base, VAE decode), not only the model's own calls.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import peft
import torch

from deradiff.eval.generate import make_jobs, sample_variant
from deradiff.eval.sampler import SampleSettings, sample
from deradiff.eval.variants import Variant, base_call
from deradiff.sampling.guidance import unet_call

PROMPTS = ["a small red circle on a white background", "a large blue square on a black background",
           "a small green triangle on a grey background"]


def tiny_pipeline_with_lora() -> object:
    from deradiff.world import TINY_MODEL_DIR
    from deradiff.world.model import load_tiny_pipeline

    pipe = load_tiny_pipeline(TINY_MODEL_DIR)
    torch.manual_seed(0)
    pipe.unet.add_adapter(peft.LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                          init_lora_weights=False))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runners(pipe: object, jobs: list, settings: SampleSettings, batch: int) -> dict[str, Callable[[], None]]:
    def variant(kind: str, lam: float | None) -> Callable[[], None]:
        return lambda: sample_variant(pipe, Variant(kind, kind, "lora", "bench", 0.1, lam=lam), jobs, settings, batch)

    def denoiser_plus_base() -> None:
        import deradiff

        unet = pipe.unet
        deradiff.realign(pipe, lam=0.5, branches=settings.branches)
        try:
            for start in range(0, len(jobs), batch):
                chunk = jobs[start:start + batch]
                sample(pipe, unet_call(pipe.unet), base_call(unet), [p for p, _ in chunk], [s for _, s in chunk], settings)
        finally:
            deradiff.unrealign(pipe)

    return {"retrained": variant("retrained", None), "realigned": variant("realigned", 0.5),
            "realigned+base call": denoiser_plus_base}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = tiny_pipeline_with_lora()
    jobs = make_jobs(PROMPTS, range(args.seeds))
    settings = SampleSettings(steps=args.steps, eta=1.0, guidance_scale=3.0)
    runs = runners(pipe, jobs, settings, args.batch)
    runs["retrained"]()  # warm-up (lazy initialisation is billed to nobody)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"{len(jobs)} images, {args.steps} steps, batch {args.batch}, {args.repeats} repeats, {args.threads} thread(s)")
    for name, t in times.items():
        print(f"  {name:<22} median {medians[name]:6.2f} s  (min {min(t):.2f}, max {max(t):.2f})"
              f"  ratio to retrained {medians[name] / medians['retrained']:.2f}")
    return medians


if __name__ == "__main__":
    main()
