"""`deradiff eval`: realigned vs retrained comparison (report, plots, grids, results)."""

from __future__ import annotations

import argparse

from deradiff.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from deradiff.eval.config import EvalConfig

    parser = subparsers.add_parser(
        "eval", help="compare realigned, weight-scaled and retrained LoRAs (shared noise); write an HTML report",
        description="Sample base, anchor, retrained, realigned and weight-scaled models with shared noise, score "
        "them and write results.csv/json, plots, image grids and report.html under output_dir.",
    )
    add_config_arguments(parser, EvalConfig, "configs/tiny/eval.yaml")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from deradiff.eval.stage import run_eval
    from deradiff.eval.config import EvalConfig

    result = run_eval(config_from_args(EvalConfig, args))
    if result is not None:
        print(f"eval finished in {result.seconds:.1f} s; report: {result.report}")
    return 0
