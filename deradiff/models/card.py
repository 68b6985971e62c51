"""The model card (`README.md` with Hugging Face front matter) written into every trained LoRA folder, so the hub
and `huggingface_hub.ModelCard` read what the LoRA is and a reader sees how to realign it to another strength.

Built only from the LoRA's deradiff metadata (no dates, no paths): the same training writes the same card.
"""

from __future__ import annotations

import json
from typing import Any

CARD_NAME = "README.md"

# Licenses of the bases people train on (the card's `license` is the base's); anything else: "other".
BASE_LICENSES = {
    "tiny": "apache-2.0",  # deradiff's own embedded model, under the project's license
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}


def model_card(metadata: dict[str, Any]) -> str:
    """The card's text for a LoRA with this deradiff metadata."""
    base = str(metadata.get("base_model", "unknown"))
    method = str(metadata.get("method", "unknown"))
    sdxl = metadata.get("pipeline_class") == "StableDiffusionXLPipeline"
    tags = ["text-to-image", "diffusers", "lora", "deradiff", method, "stable-diffusion-xl" if sdxl else "stable-diffusion"]
    front = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: diffusers",
        f"license: {BASE_LICENSES.get(base, 'other')}",
        "tags:",
        *(f"- {tag}" for tag in tags),
        "---",
    ]
    return "\n".join([*front, "", *_body(metadata, base, method), ""])


def _body(metadata: dict[str, Any], base: str, method: str) -> list[str]:
    beta = metadata.get("beta")
    target = "beta" if beta is None else f"{beta:g}"
    rows = [("method", method), ("beta (KL strength)", "not recorded" if beta is None else f"{beta:g}"),
            ("beta units", metadata.get("beta_units", "unknown")), ("trained on", _trained_on(metadata)),
            ("steps", metadata.get("steps", "unknown")), ("seed", metadata.get("seed", "unknown")),
            ("LoRA", f"rank {metadata.get('lora_rank')}, alpha {metadata.get('lora_alpha')}, "
                     f"{', '.join(metadata.get('lora_target_modules', []))}")]
    return [
        f"# {method} LoRA for `{base}` at beta = {target}",
        "",
        "Trained with deradiff: one KL-regularized LoRA whose strength can be changed at sampling time instead of",
        "retraining (DeRaDiff, arXiv 2601.20198).",
        "",
        "| field | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "## Realign to another strength",
        "",
        "```python",
        "import deradiff",
        "",
        "deradiff.models.load_lora(pipe, \"path/to/this/folder\")  # pipe: the base pipeline",
        f"deradiff.realign(pipe, lam=0.5)  # behaves like a LoRA trained at beta = {target} / 0.5",
        "```",
    ]


def _trained_on(metadata: dict[str, Any]) -> str:
    if metadata.get("reward"):
        return f"reward `{metadata['reward']}`"
    if metadata.get("data_fingerprint"):
        return f"preference pairs (data fingerprint {str(metadata['data_fingerprint'])[:12]})"
    return "not recorded"
