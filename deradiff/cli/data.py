"""`deradiff data prefs`: tiny-world preference pairs in the Pick-a-Pic schema (parquet)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from deradiff.cli.common import add_config_arguments, config_from_args
from deradiff.config import option
from deradiff.training.dpo import PrefsSection  # light module: dataclasses only at import


PREFS_FILE = "train.parquet"


@dataclass
class PrefsConfig:
    """Where to write the pairs and how to make them."""

    output_dir: str = option("outputs/tiny/prefs", "folder for train.parquet (Pick-a-Pic columns; relative: to the "
                                                    "current directory)")
    base_model: str = option("tiny", "model that samples the pairs: 'tiny' or a diffusers folder")
    generate: PrefsSection = option(factory=PrefsSection, help="sampling and labelling")

    def validate(self) -> None:
        self.generate.check("generate.")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="preference data tools")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prefs = sub.add_parser("prefs", help="sample + reward-label tiny-world preference pairs (Bradley-Terry)")
    add_config_arguments(prefs, PrefsConfig, "configs/tiny/prefs.yaml")
    prefs.set_defaults(func=_prefs)


def _prefs(args: argparse.Namespace) -> int:
    from deradiff.data.prefs import generate_preferences
    from deradiff.training.dpo import resolve_base_model

    cfg = config_from_args(PrefsConfig, args)
    output = Path(cfg.output_dir) / PREFS_FILE
    result = generate_preferences(resolve_base_model(cfg.base_model), str(output), cfg.generate)
    print(json.dumps(result, indent=2))
    return 0
