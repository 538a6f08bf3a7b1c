"""The command line's habits, on the parser itself: every option of every command explains
itself with its default and range, and the global options parse before or after the command."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from khala_app.cli import _commands, _parser

_RANGE = re.compile(r"at least \d|above \d|between \d+ and \d+|\d or more|>= ?[-\w]")


def _options() -> list[tuple[str, argparse.Action]]:
    parser = _parser()
    found = []
    for command in [parser, *_commands(parser)]:
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                found.append((command.prog, action))
    return found


def test_the_walk_sees_every_command() -> None:
    progs = {prog for prog, _ in _options()}
    assert {"khala-stream generate", "khala-stream db init", "khala-stream dlq list"} <= progs
    assert {"khala-stream import-chat", "khala-stream lag", "khala-stream counts"} <= progs


@pytest.mark.parametrize(("prog", "action"), _options(), ids=lambda v: str(v)[:60])
def test_every_option_has_help_with_its_default_and_range(
    prog: str, action: argparse.Action
) -> None:
    name = "/".join(action.option_strings) or action.dest
    assert action.help, f"{prog} {name}: no help text"
    shown = action.default not in (None, False, 0, argparse.SUPPRESS)
    if shown or action.dest in ("retry_deadline", "database_url"):
        assert "default" in action.help, f"{prog} {name}: the help does not give the default"
    numeric = action.type in (int, float) or getattr(action.type, "__name__", "") == "parse"
    if numeric:
        assert _RANGE.search(action.help), f"{prog} {name}: the help does not give the range"


@pytest.mark.parametrize(
    "argv",
    [
        [
            "-v",
            "--json",
            "--database-url",
            "sqlite+aiosqlite:///x.db",
            "--retry-deadline",
            "5",
            "counts",
        ],
        [
            "counts",
            "-v",
            "--json",
            "--database-url",
            "sqlite+aiosqlite:///x.db",
            "--retry-deadline",
            "5",
        ],
        [
            "--json",
            "counts",
            "-v",
            "--retry-deadline",
            "5",
            "--database-url",
            "sqlite+aiosqlite:///x.db",
        ],
    ],
    ids=["before", "after", "mixed"],
)
def test_global_options_parse_before_or_after_the_command(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert args.verbose + getattr(args, "verbose_after", 0) == 1
    assert args.json is True
    assert args.database_url == "sqlite+aiosqlite:///x.db"
    assert args.retry_deadline == 5.0


def test_a_value_given_before_the_command_is_not_reset_by_its_defaults() -> None:
    args = _parser().parse_args(["--json", "--retry-deadline", "7", "import-chat"])
    assert args.json is True and args.retry_deadline == 7.0
    plain = _parser().parse_args(["import-chat"])
    assert plain.json is False and plain.retry_deadline is None and plain.verbose == 0


def test_out_of_range_numbers_are_usage_errors() -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["generate", "--out", "x.zip", "--users", "-1"])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--users", str(10**20)], "argument --users: must be at most 10,000,000"),  # was exit 1,
        (["--messages-per-thread", "10001"], "must be at most 10,000"),  # "OverflowError"
        (["--out", "{tmp}"], "is there and is not a regular file"),
        (["--out", "/dev/null"], "is there and is not a regular file"),  # was: replaced the
        (["--out", "{tmp}/no/such/x.zip"], "no such folder"),  # device; made the folders
    ],
)
def test_generate_refuses_what_it_cannot_write_over_or_into(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--out", str(tmp_path / "x.zip"), *(a.format(tmp=tmp_path) for a in argv)]
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(args)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
