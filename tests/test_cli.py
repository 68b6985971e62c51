"""The `deradiff` command: help for every subcommand, one-line errors, exit codes."""

from __future__ import annotations

import argparse

import pytest

from deradiff import cli
from deradiff.errors import DeradiffError


def _subcommand_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_subcommand_paths(sub, (*prefix, name)))
    return paths


def test_help_on_every_subcommand(capsys):
    paths = _subcommand_paths(cli.build_parser())
    for path in paths:
        with pytest.raises(SystemExit) as exc:
            cli.main([*path, "--help"])
        assert exc.value.code == 0, path
    assert capsys.readouterr().out


def test_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    def boom(args):
        raise DeradiffError("lambda must be >= 0, got -1")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=boom)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["--debug"]) == 2  # --debug accepted anywhere and stripped before parsing
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: lambda must be >= 0, got -1"


def test_bug_is_short_without_debug_and_full_with_it(monkeypatch, capsys):
    def bug(args):
        raise RuntimeError("oops")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=bug)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert cli.main(["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_building_the_parser_does_not_import_diffusers() -> None:
    """`deradiff --help` stays fast: subcommand registration only touches config dataclasses."""
    import subprocess
    import sys

    probe = "import sys, deradiff.cli as c; c.build_parser(); print(sorted({'diffusers', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
