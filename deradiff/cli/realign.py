"""`deradiff realign`: sample one trained LoRA at several strengths lambda (see deradiff.realignment.stage)."""

from __future__ import annotations

import argparse

from deradiff.cli.common import add_config_arguments, config_from_args
from deradiff.realignment.config import RealignConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "realign",
        help="sample a trained LoRA at several KL strengths (images, grids, manifest)",
        description="Sample a LoRA trained at strength beta at strengths beta/lambda, with shared noise per seed.",
    )
    add_config_arguments(parser, RealignConfig)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from deradiff.realignment.stage import run_realign

    config = config_from_args(RealignConfig, args)
    rows = run_realign(config)
    print(f"wrote {len(rows)} images, grids and manifest.csv/json to {config.output_dir}")
    return 0
