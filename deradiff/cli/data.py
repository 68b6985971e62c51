"""`deradiff data prefs`: tiny-world preference pairs in the Pick-a-Pic schema (parquet)."""

from __future__ import annotations

import argparse
import json

from deradiff.cli.common import add_config_arguments, config_from_args
from deradiff.data.config import PrefsConfig  # light module: dataclasses only at import
from deradiff.lock import OutputDirLock


PREFS_FILE = "train.parquet"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="preference data tools")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    prefs = sub.add_parser("prefs", help="sample + reward-label tiny-world preference pairs (Bradley-Terry)")
    add_config_arguments(prefs, PrefsConfig, "configs/tiny/prefs.yaml")
    prefs.set_defaults(func=_prefs)


def _prefs(args: argparse.Namespace) -> int:
    from deradiff.data.prefs import generate_preferences
    from deradiff.eval.stage import resolve_device
    from deradiff.fileio import check_output_dir, check_results_absent, remove_outputs
    from deradiff.models.pipelines import resolve_base_model

    cfg = config_from_args(PrefsConfig, args)
    # Every refusal comes before the model loads and the (slow) sampling of pairs starts.
    out = check_output_dir(cfg.output_dir)
    output = out / PREFS_FILE
    check_results_absent(out, (PREFS_FILE,), cfg.overwrite)
    base = resolve_base_model(cfg.base_model)
    with OutputDirLock(out):
        check_results_absent(out, (PREFS_FILE,), cfg.overwrite)  # again: another run may have finished into it meanwhile
        remove_outputs(out, (PREFS_FILE,))  # an overwrite never leaves the old pairs to pass for the new run's
        result = generate_preferences(base, str(output), cfg.generate, device=resolve_device(cfg.device))
    print(json.dumps(result, indent=2))
    return 0

