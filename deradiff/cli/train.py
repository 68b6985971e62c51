"""`deradiff train <method>`: one subcommand per registered trainer (see deradiff.training.registry).

To add a method, write its config schema in `deradiff/training/config.py`, register it in its own module
(e.g. `deradiff/training/ddpo.py`) and list that module in `deradiff.training.registry.TRAINER_MODULES`;
nothing here changes.
"""

from __future__ import annotations

import argparse

from deradiff.cli.common import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from deradiff.training.registry import trainers

    parser = subparsers.add_parser("train", help="train an aligned LoRA (DPO, DDPO)")
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, spec in sorted(trainers().items()):
        sub = methods.add_parser(name, help=spec.help, description=spec.help)
        add_config_arguments(sub, spec.schema, spec.default_config)
        sub.set_defaults(func=lambda args, spec=spec: _run(spec, args))


def _run(spec, args: argparse.Namespace) -> int:
    config = config_from_args(spec.schema, args)
    spec.run(config)
    return 0
