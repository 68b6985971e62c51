"""Which pipeline family a model belongs to: the one place that decides it (conditioning and saving differ)."""

from __future__ import annotations

from typing import Any


def is_sdxl(model: Any) -> bool:
    """SDXL UNets condition on `text_time` (pooled text embeddings + size ids); `model` is a UNet or a pipeline."""
    unet = getattr(model, "unet", model)
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"
