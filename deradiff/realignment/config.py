"""The `deradiff realign` config schema (`RealignConfig`), apart from the sampling code in `stage` so the CLI
can describe it without importing torch or diffusers."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from deradiff.config import check_device, check_file, check_seeds, option
from deradiff.errors import ConfigError, DeradiffError


@dataclasses.dataclass
class RealignConfig:
    output_dir: str = option(help="folder for images/, grids/, manifest.csv/json (must be empty unless overwrite)")
    lora_dir: str = option(help="folder with pytorch_lora_weights.safetensors (+ deradiff_metadata.json)")
    base_model: str | None = option(None, "diffusers folder or hub id; default: the embedded tiny model")
    lambdas: list[float] = option([0.0, 0.5, 1.0, 2.0], "strengths to sample: 0 base, 1 aligned, 0.5 ~ 2*beta, 2 ~ beta/2")
    prompts_file: str | None = option(None, "text file, one prompt a line; default: the tiny world's eval prompts",
                                      relative_to_yaml=True)
    prompts: list[str] = option([], "prompts given inline (used instead of prompts_file when non-empty)")
    seeds: list[int] = option([0, 1, 2, 3], "one image per seed; every lambda shares each seed's noise")
    steps: int = option(20, "denoising steps")
    sampler: Literal["ddim", "ddpm", "euler_a", "euler", "dpm"] = option(
        "ddim", "scheduler; ddpm, euler_a and ddim with eta>0 are exact, the others approximate")
    eta: float = option(1.0, "DDIM eta (1 = stochastic, exact; 0 = deterministic, approximate)")
    guidance: float = option(7.5, "classifier-free guidance scale")
    height: int | None = option(None, "image height in pixels; default: the model's")
    width: int | None = option(None, "image width in pixels; default: the model's")
    beta: float | None = option(None, "KL strength the LoRA was trained at; default: from its deradiff metadata")
    device: str = option("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", "weights dtype")
    overwrite: bool = option(False, "allow writing into a non-empty output_dir")
    max_batch: int = option(8, "most images (lambdas x seeds) per pipeline call; lambdas beyond it run in more calls")
    branches: Literal["auto", "stacked", "two-call"] = option(
        "auto", "how the reference and aligned branches run per step: auto (one stacked forward when that adds "
                "at most 2 rows to the call, else two calls), stacked (always one forward), two-call (least memory)")

    def validate(self) -> None:
        from deradiff.realignment.mixing import check_lambda

        if not self.lambdas:
            raise ConfigError("config key 'lambdas' must list at least one value")
        for i, lam in enumerate(self.lambdas):
            try:
                check_lambda(lam, f"lambdas[{i}]")
            except DeradiffError as exc:
                raise ConfigError(f"config key {exc}") from None
        _check_distinct_lambdas(self.lambdas)
        if not self.seeds:
            raise ConfigError("config key 'seeds' must list at least one seed")
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            raise ConfigError(f"config key 'seeds' lists {repeated} more than once; list each seed once")
        if self.steps < 1:
            raise ConfigError(f"config key 'steps' must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise ConfigError(f"config key 'eta' must be >= 0, got {self.eta}")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"config key '{key}' must be a positive multiple of 8, got {value}")
        if self.max_batch < 1:
            raise ConfigError(f"config key 'max_batch' must be >= 1, got {self.max_batch}")
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"config key 'beta' must be > 0, got {self.beta}")
        check_seeds(self.seeds, "seeds")
        check_device(self.device, "device")
        if not self.prompts and self.prompts_file is not None:
            check_file(self.prompts_file, "prompts_file", "a text file, one prompt a line")


def _check_distinct_lambdas(lambdas: list[float]) -> None:
    """Two equal or float-close lambdas would sample one strength twice (and once shared one file name)."""
    for i, a in enumerate(lambdas):
        for j in range(i):
            if math.isclose(a, lambdas[j], rel_tol=1e-9, abs_tol=1e-12):
                raise ConfigError(f"config key 'lambdas' lists one strength twice: lambdas[{j}]={lambdas[j]!r} and "
                                  f"lambdas[{i}]={a!r}; list each lambda once")
