"""The embedded tiny world: captioned synthetic shapes, its prompt lists, a tiny SD-format model and a judge.

Public API (other stages code against these names):
- `TINY_MODEL_DIR`: path of the shipped tiny Stable Diffusion pipeline (diffusers format, safetensors).
- `load_prompts(split)`: shipped train/eval prompt lists.
- `parse_prompt(prompt) -> PromptSpec`, `render(spec, rng) -> PIL image`.
- `deradiff.world.classifier.load_classifier()`, `deradiff.world.quality.measure_quality(...)`.
"""

from deradiff.world.paths import ASSETS_DIR, TINY_MODEL_DIR
from deradiff.world.promptset import load_prompts
from deradiff.world.render import IMAGE_SIZE, render, render_batch
from deradiff.world.spec import BACKGROUNDS, COLOURS, SHAPES, SIZES, PromptSpec, format_prompt, parse_prompt

__all__ = [
    "ASSETS_DIR", "BACKGROUNDS", "COLOURS", "IMAGE_SIZE", "SHAPES", "SIZES", "TINY_MODEL_DIR", "PromptSpec",
    "format_prompt", "load_prompts", "parse_prompt", "render", "render_batch",
]
