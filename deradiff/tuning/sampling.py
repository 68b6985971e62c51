"""Sample many lambdas at once: one batch of trajectories per chunk of (prompt, seed) jobs, with shared noise.

The trajectories are the realign sweep's (`TrajectoryLambdas`: row k follows lambda k, and rows of the same
(prompt, seed) share their branch evaluations while their inputs agree); the loop is the eval's shared-noise
sampler. Each row's reference branch is the base model's prediction at that row's state, so it also gives the
row's path KL to the base. A tuned lambda's numbers are thus the eval's numbers for that lambda, and the chosen
lambda can be compared with a retrained LoRA on the same noise.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from deradiff.eval.generate import Job, VariantSamples
from deradiff.eval.sampler import SampleSettings, sample
from deradiff.eval.variants import TimedCall
from deradiff.realignment.branches import Branches
from deradiff.realignment.sweep import TrajectoryCall, TrajectoryLambdas


def sample_lambdas(pipe: Any, lambdas: Sequence[float], jobs: Sequence[Job], settings: SampleSettings, batch_size: int,
                   on_batch: Callable[[int], Any] = lambda n: None, aligned_unet: Any = None) -> dict[float, VariantSamples]:
    """Images and path KL of the anchor realigned to every lambda on every job (job order within each lambda).

    `pipe` carries the anchor LoRA (or is the base, with `aligned_unet` the aligned model); it is not modified.
    `batch_size` bounds the trajectories per call (at least one job's worth of lambdas); `on_batch(images)` after
    each call. Seconds are the denoiser's own.
    """
    lambdas = list(lambdas)
    per_call = max(1, batch_size // len(lambdas))
    branches = Branches(pipe.unet, aligned_unet, settings.branches)
    images: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    seconds = 0.0
    for start in range(0, len(jobs), per_call):
        chunk = jobs[start:start + per_call]
        rows = TrajectoryLambdas([lam for lam in lambdas for _ in chunk], [g for _ in lambdas for g in range(len(chunk))])
        model = TimedCall(TrajectoryCall(branches, rows))
        out = sample(pipe, model, None, [p for _ in lambdas for p, _ in chunk], [s for _ in lambdas for _, s in chunk],
                     settings)
        images.append(out.images.unflatten(0, (len(lambdas), len(chunk))))
        kls.append(out.path_kl.unflatten(0, (len(lambdas), len(chunk))))
        seconds += model.seconds
        on_batch(len(lambdas) * len(chunk))
    all_images, all_kls = torch.cat(images, dim=1), torch.cat(kls, dim=1)
    share = seconds / len(lambdas)  # one call served every lambda: each is billed an equal share
    return {lam: VariantSamples(all_images[k], all_kls[k], share) for k, lam in enumerate(lambdas)}
