"""Draw a world image for a prompt spec.

Shapes are drawn at 4x resolution and box-downsampled, so edges are anti-aliased like a real image and the
VAE/classifier see soft boundaries instead of aliasing artefacts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from deradiff.world.spec import BACKGROUNDS, COLOURS, SIZES, PromptSpec

IMAGE_SIZE = 32
SUPERSAMPLE = 4
# Shape radius as a fraction of the image side, per size word (uniformly sampled inside the range).
RADIUS_RANGE = {"small": (0.14, 0.19), "large": (0.28, 0.36)}
COLOUR_JITTER = 12


def fill_spec(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """Pick a size when the prompt leaves it open, so every rendered image has a concrete size label."""
    if spec.size is not None:
        return spec
    return PromptSpec(spec.colour, spec.shape, SIZES[int(rng.integers(len(SIZES)))], spec.background)


def render(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One RGB image of `spec` with random position, radius and slight colour jitter drawn from `rng`."""
    spec = fill_spec(spec, rng)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    lo, hi = RADIUS_RANGE[spec.size]
    radius = float(rng.uniform(lo, hi)) * big
    margin = radius * 1.05 + SUPERSAMPLE
    cx, cy = rng.uniform(margin, big - margin, size=2)
    colour = tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255))
                   for c in COLOURS[spec.colour])
    _draw_shape(ImageDraw.Draw(image), spec.shape, float(cx), float(cy), radius, colour)
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    """Circle of radius r, square of half-side 0.9 r, upward equilateral triangle of circumradius 1.05 r
    (lowered by r/4 so its centroid sits near the centre): roughly equal visual weight for each shape."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        h = 0.9 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif shape == "triangle":
        R, oy = 1.05 * r, cy + 0.25 * r
        pts = [(cx + R * math.cos(a), oy - R * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        draw.polygon(pts, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack PIL images into a float tensor [B,3,H,W] in [0,1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def render_batch(specs: Sequence[PromptSpec], rng: np.random.Generator,
                 size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[PromptSpec]]:
    """Render many specs; returns images [B,3,H,W] in [0,1] and the filled specs (concrete sizes)."""
    filled = [fill_spec(s, rng) for s in specs]
    return to_tensor([render(s, rng, size) for s in filled]), filled
