"""Argument helpers shared by every `deradiff` subcommand."""

from __future__ import annotations

import argparse
from typing import TypeVar

from deradiff.config import describe, load_config

T = TypeVar("T")


def add_config_arguments(parser: argparse.ArgumentParser, schema: type, default_config: str | None = None) -> None:
    """`--config FILE` plus trailing `key=value` overrides; the epilog lists every key of `schema`."""
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, nested keys dotted")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    rows = describe(schema)
    width = max(len(key) for key, _, _ in rows)
    parser.epilog = "config keys:\n" + "\n".join(f"  {k:<{width}}  {t}: {h}" for k, t, h in rows)


def config_from_args(schema: type[T], args: argparse.Namespace) -> T:
    """Load the config named by `--config` with the trailing overrides applied."""
    return load_config(schema, args.config, args.overrides)
