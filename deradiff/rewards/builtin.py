"""Built-in rewards that need no external model: vividness, JPEG (in)compressibility, tiny-world fidelity."""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from deradiff.rewards.base import Reward, register_reward


@register_reward("vividness")
class Vividness(Reward):
    """Aesthetic-like score: the mean chroma (max - min over RGB, i.e. HSV saturation x value) of the pixels.

    White, gray and black pixels score 0 and a fully saturated pixel scores 1, so the score is roughly the
    share of the canvas covered by vivid colour. That makes the trade-off real: a model optimised hard for
    it learns to flood the canvas (or paint the background) with colour, which destroys shape fidelity.
    `power` > 1 rewards only strongly saturated pixels.
    """

    differentiable = True

    def __init__(self, power: float = 1.0) -> None:
        self.power = power

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        chroma = images.amax(dim=1) - images.amin(dim=1)
        return chroma.pow(self.power).mean(dim=(1, 2))


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kB (1000 bytes) of each image, as in DDPO's compressibility rewards."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    sizes = []
    for im in arr:
        buffer = io.BytesIO()
        Image.fromarray(im).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Negative JPEG size in kB: simpler, flatter images score higher (DDPO's compressibility task)."""

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_kilobytes(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """JPEG size in kB: busier, more detailed images score higher (DDPO's incompressibility task)."""

    def __init__(self, quality: int = 95) -> None:
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return jpeg_kilobytes(images, self.quality)


@register_reward("fidelity")
class Fidelity(Reward):
    """Tiny-world prompt fidelity: the classifier's joint probability of the prompt's colour, shape and
    (when named) size. Prompts outside the tiny world raise a DeradiffError from the parser."""

    def __init__(self, classifier_dir: Optional[str] = None) -> None:
        from deradiff.world.classifier import load_classifier

        self.classifier = load_classifier(classifier_dir)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from deradiff.world.spec import parse_prompt

        specs = [parse_prompt(p) for p in prompts]
        probs = {k: v.softmax(-1) for k, v in self.classifier(images.cpu()).items()}
        heads = self.classifier.heads
        out = torch.ones(len(specs))
        for i, spec in enumerate(specs):
            for head in ("colour", "shape", "size"):
                value = getattr(spec, head)
                if value is not None:
                    out[i] *= probs[head][i, heads[head].index(value)]
        return out.to(images.device)
