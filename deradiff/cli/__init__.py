"""The `deradiff` command: one subcommand group per stage, each registered by its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from deradiff.errors import DeradiffError

# Each module exposes `register(subparsers)`; a missing module (stage not built yet) is simply absent.
COMMAND_MODULES = ("tiny", "data", "train", "realign", "eval", "tune", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deradiff", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"deradiff.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"deradiff.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; user errors print one line and exit 2, bugs exit 1 (traceback with --debug).
    User errors: `DeradiffError`, and an `OSError` naming a file (a missing, unreadable or unwritable path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, also after the subcommand
    try:
        args = build_parser().parse_args(argv)
        result = args.func(args)
        return int(result or 0)
    except DeradiffError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the machine refused (missing, no permission, disk full): the user's to fix
        if exc.filename is None:
            return _bug(exc, debug)
        if debug:
            traceback.print_exc()
        print(f"error: '{exc.filename}': {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a short message
        return _bug(exc, debug)


def _bug(exc: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1


def run_entry(command: Sequence[str]) -> None:
    """Entry scripts (train/dpo.py, ...) call this with their fixed subcommand prefix."""
    sys.exit(main([*command, *sys.argv[1:]]))
