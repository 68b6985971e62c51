"""How faithful a pipeline's images are to world prompts, judged by the fidelity classifier."""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from deradiff.world.classifier import TinyClassifier, load_classifier
from deradiff.world.spec import parse_prompt

DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 20


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Images [N,3,H,W] in [0,1]; image i uses its own generator seeded with seeds[i] (batch-independent)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="sample", unit="batch", disable=not progress):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        result = pipe(list(prompts[i:i + batch_size]), num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=gens, output_type="pt")
        out.append(result.images.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def judge(images: torch.Tensor, prompts: Sequence[str], classifier: TinyClassifier) -> dict[str, float]:
    """Fraction of images whose predicted colour/shape (and size, where the prompt names one) match."""
    preds = classifier.predict(images)
    specs = [parse_prompt(p) for p in prompts]
    colour = [p == s.colour for p, s in zip(preds["colour"], specs)]
    shape = [p == s.shape for p, s in zip(preds["shape"], specs)]
    size = [p == s.size for p, s in zip(preds["size"], specs) if s.size is not None]
    both = [c and s for c, s in zip(colour, shape)]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {"colour_acc": mean(colour), "shape_acc": mean(shape), "size_acc": mean(size),
            "colour_shape_acc": mean(both), "n": len(specs)}


def measure_quality(pipe, prompts: Sequence[str], seeds: Sequence[int], classifier: Optional[TinyClassifier] = None,
                    num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                    batch_size: int = 16, progress: bool = True) -> dict[str, float]:
    """Generate one image per (prompt, seed) and judge it; also reports sampling seconds per image."""
    classifier = classifier if classifier is not None else load_classifier()
    start = time.perf_counter()
    images = generate(pipe, prompts, seeds, num_inference_steps, guidance_scale, batch_size, progress)
    elapsed = time.perf_counter() - start
    result = judge(images, prompts, classifier)
    result.update(seconds_per_image=elapsed / max(len(prompts), 1), num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale)
    return result
