"""`deradiff tiny pretrain|quality`: build the embedded tiny world's model and measure its fidelity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deradiff.cli.common import add_config_arguments, config_from_args
from deradiff.config import save_config
from deradiff.errors import DeradiffError
from deradiff.world.config import QualityConfig

DEFAULT_PRETRAIN_CONFIG = "configs/tiny/pretrain.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tiny` with its `pretrain` and `quality` subcommands."""
    from deradiff.world.config import PretrainConfig

    tiny = subparsers.add_parser("tiny", help="the embedded tiny world: pretrain its model, measure quality")
    sub = tiny.add_subparsers(dest="tiny_command", metavar="SUBCOMMAND", required=True)
    pretrain = sub.add_parser("pretrain", help="train classifier, VAE, UNet + text encoder from scratch")
    add_config_arguments(pretrain, PretrainConfig, DEFAULT_PRETRAIN_CONFIG)
    pretrain.set_defaults(func=_pretrain)
    quality = sub.add_parser("quality", help="colour/shape/size accuracy of generated images (classifier-judged)")
    add_config_arguments(quality, QualityConfig, None)
    quality.set_defaults(func=_quality)


def _pretrain(args: argparse.Namespace) -> int:
    from deradiff.world.config import PretrainConfig
    from deradiff.world.pretrain import run_pretrain

    cfg = config_from_args(PretrainConfig, args)
    summary = run_pretrain(cfg)
    _print_summary("tiny pretrain", summary, Path(cfg.output_dir))
    return 0


def _quality(args: argparse.Namespace) -> int:
    from deradiff.world import TINY_MODEL_DIR, load_prompts
    from deradiff.world.classifier import load_classifier
    from deradiff.world.model import load_tiny_pipeline
    from deradiff.world.quality import measure_quality

    cfg = config_from_args(QualityConfig, args)
    model_dir = cfg.model_dir or TINY_MODEL_DIR
    if not (Path(model_dir) / "model_index.json").is_file():
        raise DeradiffError(f"model_dir '{model_dir}' is not a diffusers pipeline (no model_index.json)")
    prompts = load_prompts(cfg.split)
    chosen = [prompts[i % len(prompts)] for i in range(cfg.num_images)]
    result = measure_quality(load_tiny_pipeline(model_dir), chosen, [cfg.seed + i for i in range(cfg.num_images)],
                             classifier=load_classifier(cfg.classifier_dir or None),
                             num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                             batch_size=cfg.batch_size)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"model_dir": str(model_dir), **result}, indent=2) + "\n")
    save_config(cfg, out / "quality_config.yaml")
    _print_summary(f"tiny quality ({cfg.split}, {cfg.num_images} images)", result, out)
    return 0


def _print_summary(title: str, summary: dict, out: Path) -> None:
    """Flat `key: value` lines, nested dicts dotted, floats to 4 digits."""
    print(f"== {title} -> {out}")
    for key, value in _flatten(summary):
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


def _flatten(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
