"""`deradiff study`: prefs -> anchor at beta0 -> K retrained -> eval -> report, resumable, with compute accounting."""

from __future__ import annotations

import argparse

from deradiff.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from deradiff.study import StudyConfig

    parser = subparsers.add_parser(
        "study", help="end-to-end realignment study (train anchor + retrained LoRAs, eval, report)",
        description="Make preference data if missing, train the anchor LoRA at beta0 and retrained LoRAs at the other "
        "betas, evaluate realigned vs retrained, and write report.html + summary.json. Finished stages are skipped "
        "on rerun (keyed by a hash of their config), so an interrupted study resumes.",
    )
    add_config_arguments(parser, StudyConfig, "configs/tiny/study.yaml")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from deradiff.study import StudyConfig, format_summary, run_study

    print(format_summary(run_study(config_from_args(StudyConfig, args))))
    return 0
