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
from pathlib import Path
from typing import Any

from deradiff.config import save_config
from deradiff.errors import DeradiffError
from deradiff.fileio import (atomic_path, check_output_dir, check_results_absent, read_prompt_file, remove_outputs,
                             write_error, write_text_atomic)
from deradiff.realignment.config import RealignConfig
from deradiff.lock import LOCK_NAME, OutputDirLock

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
