"""Argument helpers shared by every `deradiff` subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeVar

from deradiff.config import describe, load_config
from deradiff.errors import ConfigError

T = TypeVar("T")

PATHS_NOTE = (
    "Relative paths are read from the current directory, where outputs land too; keys noted 'relative path in a "
    "YAML: from that YAML's folder' are the exception when set in a YAML file. String keys take the text as "
    "written (quote 'null' for the word); other keys take numbers, true/false (yes/no, on/off) or null."
)


def add_config_arguments(parser: argparse.ArgumentParser, schema: type, default_config: str | None = None) -> None:
    """`--config FILE` plus trailing `key=value` overrides; the epilog lists every key of `schema`."""
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, nested keys dotted")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(default_config=default_config)
    rows = describe(schema)
    width = max(len(key) for key, _, _ in rows)
    keys = "\n".join(f"  {k:<{width}}  {t}: {h}" for k, t, h in rows)
    parser.epilog = f"config keys:\n{keys}\n\n{PATHS_NOTE}"


def config_from_args(schema: type[T], args: argparse.Namespace) -> T:
    """Load the config named by `--config` with the trailing overrides applied."""
    if args.config is not None and not Path(args.config).is_file():
        is_default = args.config == getattr(args, "default_config", None)
        default = " (the default, relative to the current directory)" if is_default else ""
        raise ConfigError(f"--config '{args.config}'{default} does not exist (expected a YAML file)")
    return load_config(schema, args.config, args.overrides)
