"""`deradiff realign`: sample a LoRA at several strengths with shared noise; PNGs, grids and a manifest.

For every prompt, every lambda and every seed, one image; the same seed gives every lambda the same initial
and per-step noise (one `torch.Generator` per image, seeded from the seed), so a row of the grid differs only
by strength. All lambdas x seeds of a prompt are sampled as one batch of trajectories (up to `max_batch`,
`deradiff.realignment.sweep`): one denoiser call per step instead of one per lambda. Layout of `output_dir`:

    images/p{prompt:03d}_lam{lambda}_seed{seed}.png   lambda as written (2, 0.5), in full where that is ambiguous
    grids/p{prompt:03d}.png          rows = lambdas (config order), columns = seeds
    manifest.csv, manifest.json      prompt, seed, lambda, effective beta, file
    config.yaml                      the config that produced them

One run at a time holds `output_dir` (`OutputDirLock`). `overwrite=true` first removes everything a previous
run wrote (manifests first), and a run that fails removes what it wrote: a manifest only ever sits beside
the images of its own, finished run. Images that are not finite (NaN/inf) are refused, never written.

This module's top level imports no torch/diffusers, so `deradiff --help` stays fast.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from deradiff.config import check_device, check_file, check_seeds, option, save_config
from deradiff.errors import ConfigError, DeradiffError
from deradiff.fileio import (atomic_path, check_output_dir, check_results_absent, read_prompt_file, remove_outputs,
                             write_error, write_text_atomic)
from deradiff.training.lock import LOCK_NAME, OutputDirLock

# What a run writes into output_dir, in the order overwrite removes it: manifests first, so an interrupted
# removal never leaves a manifest describing images that are gone or stale.
OUTPUTS = ("manifest.json", "manifest.csv", "config.yaml", "images", "grids")

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


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


def run_realign(config: RealignConfig) -> list[dict[str, Any]]:
    """Sample every (prompt, lambda, seed); returns the manifest rows (also written to output_dir)."""
    import torch

    from deradiff.models.pipelines import check_lora_dir, load_lora, load_pipeline

    out = check_output_dir(config.output_dir)
    check_results_absent(out, None, config.overwrite, ignore=(LOCK_NAME,), refusal=_not_empty)
    prompts = _prompts(config)
    device = _device(config.device)
    check_lora_dir(config.lora_dir, "lora_dir")
    pipe = load_pipeline(config.base_model or _tiny_model_dir(), torch_dtype=getattr(torch, config.dtype), device=device)
    metadata = load_lora(pipe, config.lora_dir) or {}
    # locked only once every input has loaded: a bad input leaves no folders behind
    with OutputDirLock(out):
        # again: another run may have finished into it meanwhile
        check_results_absent(out, None, config.overwrite, ignore=(LOCK_NAME,), refusal=_not_empty)
        remove_outputs(out, OUTPUTS)
        try:
            return _sample_all(pipe, out, prompts, config, metadata, device)
        except BaseException:
            remove_outputs(out, OUTPUTS)  # a failed run leaves no half-written results
            raise


def _sample_all(pipe: Any, out: Path, prompts: list[str], config: RealignConfig, metadata: dict,
                device: Any) -> list[dict[str, Any]]:
    """Sample and write images and grids, then the manifests (last: they mark a finished run)."""
    from tqdm.auto import tqdm

    import deradiff
    from deradiff.realignment.mixing import describe_strength, effective_beta

    _make_output_dirs(out)
    pipe.scheduler = _scheduler(config.sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    beta = config.beta if config.beta is not None else metadata.get("beta")
    handle = deradiff.realign(pipe, lam=config.lambdas[0], beta=beta, branches=config.branches)
    rows: list[dict[str, Any]] = []
    total = len(prompts) * len(config.lambdas) * len(config.seeds)
    # closed on errors too, so an error line never lands on the unfinished progress-bar line
    with tqdm(total=total, desc="realign", unit="img") as bar:
        for p, prompt in enumerate(prompts):
            grid = _sample_lambdas(pipe, p, prompt, config, device)
            for lam, images in zip(config.lambdas, grid):
                for seed, image in zip(config.seeds, images):
                    file = Path("images") / f"p{p:03d}_lam{_lambda_label(lam)}_seed{seed}.png"
                    _save_image(image, out / file)
                    eff = effective_beta(beta, lam)
                    rows.append({"prompt_index": p, "prompt": prompt, "seed": seed, "lambda": lam,
                                 "effective_beta": eff if eff not in (None, float("inf")) else None,
                                 "strength": describe_strength(beta, lam), "file": file.as_posix()})
                bar.update(len(images))
            _save_grid(grid, out / "grids" / f"p{p:03d}.png")
    handle.undo()
    _write_manifest(out, rows, config, metadata)
    return rows


def _sample_lambdas(pipe: Any, index: int, prompt: str, config: RealignConfig, device: Any) -> list[list[Any]]:
    """images[lambda][seed] (PIL) for one prompt, all lambdas as one batch of trajectories (up to max_batch);
    each image has its own generator from its seed, so it equals a single-image call with that seed and lambda.
    Sampled as arrays first: PIL conversion would silently turn NaN pixels into black ones."""
    from diffusers.image_processor import VaeImageProcessor

    from deradiff.realignment.sweep import sweep

    result = sweep(pipe, [prompt], config.seeds, config.lambdas, max_batch=config.max_batch,
                   generator_device="cpu" if device.type == "mps" else device, num_inference_steps=config.steps,
                   guidance_scale=config.guidance, eta=config.eta, height=config.height, width=config.width,
                   output_type="np")
    grid = [per_prompt[0] for per_prompt in result.images]
    for lam, images in zip(config.lambdas, grid):
        _check_finite(images, lam, index, prompt)
    return [[VaeImageProcessor.numpy_to_pil(image)[0] for image in images] for images in grid]


def _check_finite(images: list[Any], lam: float, index: int, prompt: str) -> None:
    import numpy as np

    if not all(np.isfinite(image).all() for image in images):
        raise DeradiffError(f"lambda {lam:g} gave non-finite images (NaN or inf) for prompt {index} ('{prompt}'); "
                            "the LoRA diverges at this strength, so no images were kept")


def _lambda_label(lam: float) -> str:
    """The lambda in a file name: its short form (2, 0.5) when that names it exactly, else its full repr, so
    two different lambdas never share a file."""
    short = f"{lam:g}"
    return short if float(short) == lam else repr(float(lam))


def _check_distinct_lambdas(lambdas: list[float]) -> None:
    """Two equal or float-close lambdas would sample one strength twice (and once shared one file name)."""
    for i, a in enumerate(lambdas):
        for j in range(i):
            if math.isclose(a, lambdas[j], rel_tol=1e-9, abs_tol=1e-12):
                raise ConfigError(f"config key 'lambdas' lists one strength twice: lambdas[{j}]={lambdas[j]!r} and "
                                  f"lambdas[{i}]={a!r}; list each lambda once")


def _not_empty(folder: str, found: list[Path]) -> str:
    """The refusal of a realign run: it owns its whole output folder, so anything in it but a lock file left
    by a run counts as earlier results."""
    return f"output_dir '{folder}' is not empty; choose another or pass overwrite=true"


def _make_output_dirs(out: Path) -> None:
    for sub in ("images", "grids"):
        try:
            (out / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, out / sub) from exc


def _save_image(image: Any, path: Path) -> None:
    """PNG written atomically: a full disk or a kill never leaves a truncated image under its final name."""
    with atomic_path(path) as tmp:
        image.save(tmp)


def _save_grid(grid: list[list[Any]], path: Path) -> None:
    """One PNG of a prompt's images (diffusers' `make_image_grid`): rows = lambdas, columns = seeds."""
    from diffusers.utils import make_image_grid

    _save_image(make_image_grid([image for images in grid for image in images], rows=len(grid), cols=len(grid[0])), path)


def _prompts(config: RealignConfig) -> list[str]:
    if config.prompts:
        return list(config.prompts)
    path = Path(config.prompts_file) if config.prompts_file else _tiny_eval_prompts_file()
    if not path.is_file():
        raise DeradiffError(f"prompts_file '{path}' does not exist (expected a text file, one prompt a line)")
    return read_prompt_file(path, "prompts_file")


def _tiny_model_dir() -> str:
    try:
        from deradiff.world.paths import TINY_MODEL_DIR
    except ImportError as exc:
        raise DeradiffError(f"no base_model given and the embedded tiny model is unavailable ({exc})") from None
    return str(TINY_MODEL_DIR)


def _tiny_eval_prompts_file() -> Path:
    """The tiny world's eval prompt list (deradiff/world/prompts/eval.txt)."""
    try:
        from deradiff.world.paths import PROMPTS_DIR
    except ImportError as exc:
        raise DeradiffError(f"no prompts given and the tiny world's prompts are unavailable ({exc})") from None
    return Path(PROMPTS_DIR) / "eval.txt"


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise DeradiffError(f"device '{name}' is not a torch device ({exc})") from None


def _scheduler(sampler: str, scheduler_config: Any) -> Any:
    import diffusers

    return getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler_config)


def _write_manifest(out: Path, rows: list[dict[str, Any]], config: RealignConfig, metadata: dict) -> None:
    with atomic_path(out / "manifest.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    summary = {"grid": {"rows": "lambdas", "columns": "seeds", "lambdas": config.lambdas, "seeds": config.seeds},
               "lora_metadata": metadata, "images": rows}
    write_text_atomic(out / "manifest.json", json.dumps(summary, indent=2))
    with atomic_path(out / "config.yaml") as tmp:
        save_config(dataclasses.replace(config, overwrite=False), tmp)  # rerunning it never replaces
