"""The command line as a new user meets it: `--version`, help text on every option of every command, and the
global options accepted after the subcommand as well as before it."""

from __future__ import annotations

import argparse

import pytest

from oppsync_pipeline.cli import parser


def all_parsers(p: argparse.ArgumentParser, path: str = "oppsync"):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{path} {name}")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("oppsync ") and out.strip() != "oppsync"


def test_every_option_of_every_command_has_help():
    missing = [
        f"{path}: {'/'.join(a.option_strings) or a.dest}"
        for path, p in all_parsers(parser())
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "x.yaml", "sync", "--connection", "a"],
        ["sync", "--connection", "a", "--config", "x.yaml"],
        ["-v", "webhooks", "register", "--connection", "a", "--public-url", "https://h", "--config", "x.yaml"],
        ["sandbox", "advance", "--hours", "2", "--config", "x.yaml", "-v"],
    ],
)
def test_global_options_before_or_after_the_command(argv):
    args = parser().parse_args(argv)
    assert args.config == "x.yaml"


def test_left_out_after_the_command_keeps_what_came_before():
    args = parser().parse_args(["--config", "before.yaml", "-v", "config", "check"])
    assert args.config == "before.yaml" and args.verbose is True
    assert parser().parse_args(["config", "check"]).config is None
