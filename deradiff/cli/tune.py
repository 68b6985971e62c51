"""`deradiff tune`: the lambda (hence beta) that best meets a criterion, with intervals, fronts and grids."""

from __future__ import annotations

import argparse

from deradiff.cli.common import add_config_arguments, config_from_args

INFEASIBLE_EXIT = 3  # the tune ran and wrote its results, but no lambda met the criterion


def register(subparsers: argparse._SubParsersAction) -> None:
    from deradiff.tuning.config import TuneConfig

    parser = subparsers.add_parser(
        "tune", help="choose the KL strength: the lambda that best meets a criterion (with an optional retraining check)",
        description="Sample the anchor LoRA realigned to a dense grid of lambdas and then a finer one, measure every "
        "lambda with bootstrap intervals, choose the lambda that best meets the criterion (constraints must hold on "
        "the whole interval; ties go to the smaller lambda), and write tune.json, tune.csv, tune.html, plots/ and "
        f"grids/ under output_dir. Exit status {INFEASIBLE_EXIT} when no lambda meets the criterion (results are "
        "still written).",
    )
    add_config_arguments(parser, TuneConfig, "configs/tiny/tune.yaml")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from deradiff.tuning.config import TuneConfig
    from deradiff.tuning.stage import format_summary, run_tune

    result = run_tune(config_from_args(TuneConfig, args))
    print(format_summary(result))
    return 0 if result.choice is not None else INFEASIBLE_EXIT
