"""The README's Python API example runs as written (LoRA path swapped for a local one) without the
approximate-sampler warning: its flagship sampler makes the mixture exact."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from deradiff.models.lora import save_lora
from deradiff.realignment.schedulers import ApproximateSamplerWarning

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs_with_an_exact_sampler(tmp_path, add_lora):
    from deradiff.world import TINY_MODEL_DIR
    from deradiff.world.model import load_tiny_pipeline

    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lora_path = re.search(r'load_lora_weights\("([^"]+)"\)', code).group(1)
    pipe = load_tiny_pipeline(TINY_MODEL_DIR)
    folder = save_lora(add_lora(pipe.unet), tmp_path / "lora", {"base_model": "tiny", "beta": 0.08})
    code = code.replace(lora_path, str(folder)).replace("images[0]", "images[0]; images.append(image)")
    images: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximateSamplerWarning)
        exec(code, {"images": images})
    assert len(images) == 1 and images[0].size == (32, 32)
