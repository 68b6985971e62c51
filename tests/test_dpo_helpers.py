"""Shared fixtures for DPO/data tests: a saved tiny random SD(XL) base model and synthetic Pick-a-Pic parquet."""

from __future__ import annotations

from pathlib import Path

import torch

from deradiff.data.prefs import png_bytes, write_parquet
from deradiff.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def save_tiny_base(folder: Path, sdxl: bool = False) -> str:
    pipe = (tiny_sdxl_pipeline if sdxl else tiny_sd_pipeline)()
    pipe.save_pretrained(str(folder))
    return str(folder)


def synthetic_pairs(n: int, size: int = 16, seed: int = 0, ties: int = 0, corrupt: int = 0) -> dict[str, list]:
    """Pairs where image 0 (bright) is preferred in even rows and image 1 in odd rows."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        bright = torch.rand(3, size, size, generator=g) * 0.3 + 0.7
        dark = torch.rand(3, size, size, generator=g) * 0.3
        first, second = (bright, dark) if i % 2 == 0 else (dark, bright)
        rows["caption"].append(f"a red circle {i % 3}")
        rows["jpg_0"].append(png_bytes(first))
        rows["jpg_1"].append(png_bytes(second))
        label = 1.0 if i % 2 == 0 else 0.0
        rows["label_0"].append(0.5 if i < ties else label)
        rows["label_1"].append(0.5 if i < ties else 1 - label)
    for j in range(corrupt):
        rows["jpg_1"][n - 1 - j] = b"not an image"
    return rows


def write_pairs(path: Path, n: int, **kwargs) -> str:
    write_parquet(synthetic_pairs(n, **kwargs), path)
    return str(path)
