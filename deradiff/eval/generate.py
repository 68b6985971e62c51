"""Sample every variant on the same (prompt, seed) jobs, split across processes and gathered on the main one."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from deradiff.eval.sampler import SampleSettings, sample
from deradiff.eval.variants import TimedCall, Variant, base_call, model_call
from deradiff.realignment.branches import Branches
from deradiff.realignment.sweep import TrajectoryCall, TrajectoryLambdas
from deradiff.sampling.guidance import ModelCall

Job = tuple[str, int]  # (prompt, seed)
Loader = Callable[[str, str, str], Any]  # (base_model, lora_dir, device) -> pipeline carrying that LoRA


@dataclass
class VariantSamples:
    """All images of one variant in job order, their path KL to base, and the model's own compute time."""

    images: torch.Tensor
    path_kl: torch.Tensor
    seconds: float


def make_jobs(prompts: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Prompt-major (prompt, seed) pairs: the order of every variant's images."""
    return [(p, int(s)) for p in prompts for s in seeds]


def load_lora_pipeline(base_model: str, lora_dir: str, device: str) -> Any:
    """The default loader: the base pipeline with one LoRA, on `device`, progress bars off."""
    from deradiff.models.pipelines import load_lora, load_pipeline, resolve_base_model  # 'tiny' -> the world model

    pipe = load_pipeline(resolve_base_model(base_model))
    load_lora(pipe, lora_dir)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_variant(pipe: Any, variant: Variant, jobs: Sequence[Job], settings: SampleSettings, batch_size: int,
                   on_batch: Callable[[int], Any] = lambda n: None) -> VariantSamples:
    """Sample `jobs` with one variant in batches (`on_batch(images)` after each); only the model's own UNet calls are timed."""
    images, kls, seconds = [], [], 0.0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        with model_call(pipe, variant, settings.branches) as (model, base):
            timed = TimedCall(model)
            out = sample(pipe, timed, base, [p for p, _ in chunk], [s for _, s in chunk], settings)
        images.append(out.images)
        kls.append(out.path_kl)
        seconds += timed.seconds
        on_batch(len(chunk))
    if not images:
        return VariantSamples(torch.zeros(0), torch.zeros(0), 0.0)
    return VariantSamples(torch.cat(images), torch.cat(kls), seconds)


def sample_lambdas(pipe: Any, lambdas: Sequence[float], jobs: Sequence[Job], settings: SampleSettings, batch_size: int,
                   on_batch: Callable[[int], Any] = lambda n: None, aligned_unet: Any = None) -> dict[float, VariantSamples]:
    """Images and path KL of the anchor realigned to every lambda on every job (job order within each lambda), as
    one batch of trajectories per chunk of jobs: row k follows lambda k, rows of one (prompt, seed) share their
    branch evaluations while their inputs agree (the realign sweep's `TrajectoryLambdas`), and each row's
    reference branch is the base prediction at that row's state, which gives its path KL.

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


def warm_up(pipe: Any, jobs: Sequence[Job], settings: SampleSettings, call: ModelCall | None = None) -> None:
    """One untimed 1-step sample: a fresh pipeline's first UNet calls are slow (lazy init), which would
    otherwise be billed to whichever variant runs first and skew the compute accounting. `call`: the model to
    run (default: the pipeline's UNet with its adapter off)."""
    if jobs:
        sample(pipe, call or base_call(pipe.unet), None, [jobs[0][0]], [jobs[0][1]], replace(settings, steps=1))


def sample_all(
    variants: Sequence[Variant], base_model: str, jobs: Sequence[Job], settings: SampleSettings, batch_size: int,
    loader: Loader, device: str, show_progress: bool = True, desc: str = "eval sampling",
) -> dict[str, VariantSamples]:
    """Sample every variant on `jobs`, loading each LoRA's pipeline once (variants grouped by LoRA)."""
    results: dict[str, VariantSamples] = {}
    bar = tqdm(total=len(variants) * len(jobs), desc=desc, unit="image", disable=not show_progress)
    for lora, group in itertools.groupby(variants, key=lambda v: v.lora):
        pipe = loader(base_model, lora, device)
        warm_up(pipe, jobs, settings)
        group = list(group)
        batched = _realigned_together(pipe, group, jobs, settings, batch_size, bar)
        for variant in group:
            bar.set_postfix_str(variant.name)
            results[variant.name] = batched.get(variant.name) or sample_variant(pipe, variant, jobs, settings, batch_size,
                                                                                 bar.update)
        del pipe
    bar.close()
    return results


def _realigned_together(pipe: Any, group: Sequence[Variant], jobs: Sequence[Job], settings: SampleSettings,
                        batch_size: int, bar: Any) -> dict[str, VariantSamples]:
    """The realigned variants of one LoRA sampled as one batch of trajectories (`batch_size` of them per call);
    each is billed an equal share of the batch's time."""
    realigned = [v for v in group if v.kind == "realigned"]
    if len(realigned) < 2:
        return {}
    bar.set_postfix_str(f"{len(realigned)} realigned")
    lambdas = list(dict.fromkeys(v.lam for v in realigned))
    samples = sample_lambdas(pipe, lambdas, jobs, settings, batch_size, bar.update)
    return {v.name: samples[v.lam] for v in realigned}


def process_state() -> Any:
    """accelerate's PartialState; on CPU-only launches (ACCELERATE_USE_CPU=1 torchrun / accelerate launch, or
    accelerate's debug_launcher) it must be told `cpu=True` or it silently reports a single process."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def sample_distributed(
    variants: Sequence[Variant], base_model: str, jobs: Sequence[Job], settings: SampleSettings, batch_size: int,
    loader: Loader, device: str, desc: str = "eval sampling",
) -> dict[str, VariantSamples] | None:
    """Split jobs across accelerate processes, gather on main (None elsewhere); one process: plain call."""
    from accelerate.utils import gather_object

    state = process_state()
    if state.num_processes == 1:
        return sample_all(variants, base_model, jobs, settings, batch_size, loader, device, desc=desc)
    with state.split_between_processes(list(jobs)) as mine:
        local = sample_all(variants, base_model, mine, settings, batch_size, loader, str(state.device) if device == "auto" else device,
                           show_progress=state.is_main_process, desc=desc)
    gathered = gather_object([local])
    return merge(gathered, [v.name for v in variants]) if state.is_main_process else None


def merge(parts: Sequence[dict[str, VariantSamples]], names: Sequence[str]) -> dict[str, VariantSamples]:
    """Concatenate per-process results in rank order (= job order, split_between_processes is contiguous)."""
    merged = {}
    for name in names:
        chunks = [p[name] for p in parts if p[name].images.numel()]
        merged[name] = VariantSamples(
            torch.cat([c.images for c in chunks]), torch.cat([c.path_kl for c in chunks]), sum(c.seconds for c in chunks)
        )
    return merged
