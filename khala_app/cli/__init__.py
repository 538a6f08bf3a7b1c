"""The `khala-stream` command: flags → Settings → a stage's API → output → exit code.

Configuration comes from flags, then the environment, then defaults (SPEC §2); secrets only
from the environment. Heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from khala_stream.config import Settings, bootstrap_servers, settings_from_env, topic_prefix
from khala_stream.errors import KhalaError, UsageError
from khala_stream.log_throttle import Throttle
from khala_stream.terminal import EscapingFormatter, printable

Command = Callable[[argparse.Namespace, Settings], int]

# `scheme://user:password@`: the password of a URL, wherever argparse repeats an argument.
_URL_PASSWORD = re.compile(r"([A-Za-z][\w+.-]*://[^\s:/@]*:)\S*@")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line; argparse repeats bad arguments in them: never a password."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {redact(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from khala_app.cli import commands

    parser: argparse.ArgumentParser = _Parser(
        prog="khala-stream",
        description="Import Khala snapshot exports into the Laravel application's database "
        "through Kafka. Global options go before or after the command.",
    )
    _global_options(parser, after=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    for leaf in _commands(parser):
        _global_options(leaf, after=True)
    return parser


# The options every command takes, before or after its name: (flags, keyword arguments).
_GLOBAL_OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("-v", "--verbose"), {"action": "count", "help": "more log output: -v info, -vv debug"}),
    (
        ("--database-url",),
        {
            "metavar": "URL",
            "help": "SQLAlchemy URL of the Laravel database, without a password (default: "
            "DATABASE_URL, else sqlite+aiosqlite:///khala.sqlite)",
        },
    ),
    (
        ("--topic-prefix",),
        {
            "metavar": "PREFIX",
            "help": "prefix of topics and groups (default: KHALA_TOPIC_PREFIX, else khala)",
        },
    ),
    (
        ("--bootstrap-servers",),
        {
            "metavar": "HOSTS",
            "help": "Kafka brokers (default: KAFKA_BOOTSTRAP_SERVERS, else an embedded broker)",
        },
    ),
    (
        ("--retry-deadline",),
        {
            "type": float,
            "metavar": "SECONDS",
            "help": "how long to wait for an unreachable database or broker before exit 1, "
            "above 0 (default: KHALA_RETRY_DEADLINE_SECONDS, else 120)",
        },
    ),
    (
        ("--json",),
        {"action": "store_true", "help": "print the result as JSON (default: text)"},
    ),
)


def _global_options(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """Add the global options; after a command's name they override only when given.

    An option a command already defines (its own `--json` help) keeps its help, and takes a
    suppressed default there so that the value given before the command still counts.
    """
    existing = {o: a for a in parser._actions for o in a.option_strings}
    for flags, kwargs in _GLOBAL_OPTIONS:
        options = dict(kwargs)
        if flags[0] == "-v":
            options["default"] = argparse.SUPPRESS if after else 0
            if after:
                options["dest"] = "verbose_after"  # counted on top of the ones before
        elif after:
            options["default"] = argparse.SUPPRESS
        elif options.get("action") == "store_true":
            options["default"] = False
        mine = existing.get(flags[-1])
        if mine is not None:
            mine.default = options["default"]
            mine.help = mine.help or options["help"]
            continue
        parser.add_argument(*flags, **options)


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser that runs a command (`db init`, not `db`)."""
    leaves: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                leaves += _commands(child) or [child]
    return leaves


def main(argv: Sequence[str] | None = None) -> int:
    from khala_app.lifecycle import Interrupted, stop_signals
    from khala_stream.processes import PARENT_ENV, stop_with_parent

    parent = os.environ.pop(PARENT_ENV, "")
    if parent.isdigit():  # a stage child of import-chat: it ends with its parent
        stop_with_parent(int(parent))
    with stop_signals():
        try:
            return _main(argv)
        except Interrupted as exc:
            print(f"khala-stream: stopped by {exc}", file=sys.stderr)
            return exc.exit_code


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # -v / -vv raise our own loggers only: libraries' debug output carries message values,
    # which hold personal data (emails).
    # Log lines name entries and keys from the export: their control characters are escaped.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Throttle("aiokafka"))  # a broker down: a line per reconnection attempt
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # The stages import-chat starts as child processes log as verbosely as their parent.
    given = args.verbose + getattr(args, "verbose_after", 0)
    inherited = os.environ.get("KHALA_VERBOSITY", "")
    verbosity = given or (int(inherited) if inherited.isascii() and inherited.isdigit() else 0)
    os.environ["KHALA_VERBOSITY"] = str(verbosity)
    ours = logging.WARNING - 10 * min(verbosity, 2)
    for name in ("khala_app", "khala_stream", "producers", "processors", "sinks"):
        logging.getLogger(name).setLevel(ours)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # The stages' status line every few seconds, without -v: silence means stopped.
    logging.getLogger("khala_stream.status").setLevel(min(ours, logging.INFO))
    try:
        settings = settings_from_env(os.environ)
        settings = _apply_flags(settings, args)
        command: Command = args.handler
        return command(args, settings)
    except KhalaError as exc:
        if verbosity >= 2:
            traceback.print_exc()
        print(f"khala-stream: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("khala-stream: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one boundary: a line, the traceback only with -vv
        return _unexpected(exc, verbosity)


def _unexpected(exc: Exception, verbosity: int) -> int:
    """Exit 1 with one line that holds no value of the data (`describe`)."""
    from khala_stream.db.errors import describe, is_database_error

    if verbosity >= 2:
        traceback.print_exc()
    if is_database_error(exc):
        line = f"database error: {describe(exc)}"
    else:
        line = f"unexpected {type(exc).__name__}; rerun with -vv for the traceback"
    print(f"khala-stream: error: {line}", file=sys.stderr)
    return 1


def _apply_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    from dataclasses import replace

    changes: dict[str, Any] = {}
    if args.topic_prefix:
        changes["topic_prefix"] = topic_prefix(args.topic_prefix, "--topic-prefix")
    if args.database_url:
        if _URL_PASSWORD.search(args.database_url):
            raise UsageError(
                "--database-url must not hold a password (the command line shows in `ps`):"
                " put the URL in DATABASE_URL instead"
            )
        changes["database_url"] = args.database_url
    if args.bootstrap_servers:
        servers = bootstrap_servers(args.bootstrap_servers, "--bootstrap-servers")
        changes["kafka"] = replace(settings.kafka, bootstrap_servers=servers)
    if args.retry_deadline is not None:
        if not 0 < args.retry_deadline < math.inf:  # nan fails both
            raise UsageError(f"--retry-deadline must be above 0, not {args.retry_deadline:g}")
        changes["retry_deadline_s"] = args.retry_deadline
    return replace(settings, **changes) if changes else settings


def run_async(coro: Any, *, on_signal: Callable[[], None] | None = None) -> Any:
    """The one place where the event loop starts; SIGTERM/SIGINT stop it (khala_app.lifecycle).

    `on_signal`: a long-running service's graceful stop, tried first.
    """
    from khala_app.lifecycle import run_until_signalled

    return run_until_signalled(coro, on_signal=on_signal)
