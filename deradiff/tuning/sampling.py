"""Sample many lambdas at once: one batch of trajectories per chunk of (prompt, seed) jobs, with shared noise.

The trajectories are the realign sweep's (`TrajectoryLambdas`: row k follows lambda k, and rows of the same
(prompt, seed) share their branch evaluations while their inputs agree); the loop is the eval's shared-noise
sampler, which also measures each trajectory's path KL to the base. So a tuned lambda's numbers are the eval's
numbers for that lambda, and the chosen lambda can be compared with a retrained LoRA on the same noise.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from deradiff.eval.generate import Job, VariantSamples
from deradiff.eval.sampler import SampleSettings, sample
from deradiff.eval.variants import TimedCall, base_call, unet_call
from deradiff.realign.sweep import TrajectoryLambdas


def sample_lambdas(pipe: Any, lambdas: Sequence[float], jobs: Sequence[Job], settings: SampleSettings, batch_size: int,
                   on_batch: Callable[[int], Any] = lambda n: None, aligned_unet: Any = None) -> dict[float, VariantSamples]:
    """Images and path KL of the anchor realigned to every lambda on every job (job order within each lambda).

    `pipe` carries the anchor LoRA (or is the base, with `aligned_unet` the aligned model) and is left unrealigned. `batch_size` bounds the trajectories per call
    (at least one job's worth of lambdas); `on_batch(images)` after each call. Seconds are the denoiser's own.
    """
    from deradiff.realign.api import realign, unrealign
    from deradiff.realign.denoiser import BRANCH_MODES

    lambdas = list(lambdas)
    per_call = max(1, batch_size // len(lambdas))
    unet = pipe.unet
    realign(pipe, lam=lambdas[0], aligned_unet=aligned_unet, batch_branches=BRANCH_MODES[settings.branches])
    try:
        # the base: the LoRA's own UNet with the adapter off, or in two-model mode the pipeline's UNet itself
        model, base = TimedCall(unet_call(pipe.unet)), base_call(unet) if aligned_unet is None else unet_call(unet)
        images: list[torch.Tensor] = []
        kls: list[torch.Tensor] = []
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start:start + per_call]
            rows = TrajectoryLambdas([lam for lam in lambdas for _ in chunk], [g for _ in lambdas for g in range(len(chunk))])
            with pipe.unet.use_trajectories(rows):
                out = sample(pipe, model, base, [p for _ in lambdas for p, _ in chunk],
                             [s for _ in lambdas for _, s in chunk], settings)
            images.append(out.images.unflatten(0, (len(lambdas), len(chunk))))
            kls.append(out.path_kl.unflatten(0, (len(lambdas), len(chunk))))
            on_batch(len(lambdas) * len(chunk))
    finally:
        unrealign(pipe)
    all_images, all_kls = torch.cat(images, dim=1), torch.cat(kls, dim=1)
    share = model.seconds / len(lambdas)  # one call served every lambda: each is billed an equal share
    return {lam: VariantSamples(all_images[k], all_kls[k], share) for k, lam in enumerate(lambdas)}
