"""Tiny-world preference pairs: sample two images per draw from the base model, label them with a
built-in reward through a Bradley-Terry draw, write Pick-a-Pic-schema parquet.

Bradley-Terry: P(image 0 preferred) = sigmoid((r_0 - r_1) / temperature). A finite temperature gives
noisy labels like human raters; temperature -> 0 labels by the reward's argmax. Labels are 1/0 (no ties).
Images are stored losslessly (PNG bytes) in the jpg_0/jpg_1 columns; the loader decodes any format.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import torch

PARQUET_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def bradley_terry_labels(r0: torch.Tensor, r1: torch.Tensor, temperature: float,
                         generator: torch.Generator) -> torch.Tensor:
    """1.0 where image 0 wins the draw, else 0.0; temperature <= 0 means deterministic argmax."""
    if temperature <= 0:
        return (r0 >= r1).float()
    p0 = torch.sigmoid((r0.float() - r1.float()) / temperature)
    return (torch.rand(p0.shape, generator=generator) < p0).float()


def png_bytes(image: torch.Tensor) -> bytes:
    """[3,H,W] in [0,1] → PNG bytes."""
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(rows: dict[str, list], path: str | os.PathLike) -> Path:
    """Write Pick-a-Pic columns atomically (temp file + rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "caption": pa.array(rows["caption"], pa.string()),
        "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
        "jpg_1": pa.array(rows["jpg_1"], pa.binary()),
        "label_0": pa.array(rows["label_0"], pa.float64()),
        "label_1": pa.array(rows["label_1"], pa.float64()),
    })
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, str(tmp))
    os.replace(tmp, path)
    return path


@torch.no_grad()
def sample_pairs(pipe: Any, prompts: Sequence[str], pairs_per_prompt: int, num_inference_steps: int,
                 guidance_scale: float, seed: int, batch_prompts: int = 8) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(captions, images_0, images_1): two independent samples per (prompt, repeat), [N,3,H,W] in [0,1]."""
    from tqdm.auto import tqdm

    captions = [p for p in prompts for _ in range(pairs_per_prompt)]
    a, b = [], []
    with tqdm(total=len(captions), desc="prefs", unit="pair") as progress:
        for start in range(0, len(captions), batch_prompts):
            chunk = captions[start : start + batch_prompts]
            for out, offset in ((a, 0), (b, 1)):
                gens = [torch.Generator().manual_seed(seed * 1_000_003 + 2 * (start + i) + offset) for i in range(len(chunk))]
                images = pipe(list(chunk), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              generator=gens, output_type="pt").images
                out.append(images.float().cpu())
            progress.update(len(chunk))
    return captions, torch.cat(a), torch.cat(b)


def generate_preferences(base_model: str, output: str, section: Any, device: Any = "cpu",
                         prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """Sample, score, label and write `output` (parquet). `section`: a PrefsSection-like config."""
    from deradiff.models.pipelines import load_pipeline
    from deradiff.rewards import get_reward

    reward = get_reward(section.reward, **section.reward_options)  # first: an unknown or missing reward fails before any sampling
    if prompts is None:
        from deradiff.world import load_prompts

        prompts = load_prompts("train")
    pipe = load_pipeline(base_model, device=device)
    pipe.set_progress_bar_config(disable=True)
    captions, im0, im1 = sample_pairs(pipe, prompts, section.pairs_per_prompt, section.num_inference_steps,
                                      section.guidance_scale, section.seed)
    r0, r1 = reward(im0, captions), reward(im1, captions)
    if not getattr(reward, "higher_is_better", True):
        r0, r1 = -r0, -r1
    labels = bradley_terry_labels(r0, r1, section.temperature, torch.Generator().manual_seed(section.seed + 7))
    rows = {
        "caption": list(captions),
        "jpg_0": [png_bytes(x) for x in im0],
        "jpg_1": [png_bytes(x) for x in im1],
        "label_0": labels.tolist(),
        "label_1": (1 - labels).tolist(),
    }
    write_parquet(rows, output)
    agree = ((r0 >= r1).float() == labels).float().mean().item()
    return {"pairs": len(captions), "output": str(output), "reward": section.reward,
            "label_agrees_with_reward": round(agree, 4), "mean_reward": round(torch.cat([r0, r1]).mean().item(), 5)}
