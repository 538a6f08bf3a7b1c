"""The `khala-stream` command: flags → Settings → a stage's API → output → exit code.

Configuration comes from flags, then the environment, then defaults (SPEC §2); secrets only
from the environment. Heavy imports happen inside the command functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from khala_stream.config import Settings, bootstrap_servers, settings_from_env, topic_prefix
from khala_stream.errors import KhalaError, UsageError
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
        description="Import Khala snapshot exports into the Laravel database through Kafka.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--topic-prefix", help="prefix of topics and groups (KHALA_TOPIC_PREFIX)")
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the Laravel database, without a password (DATABASE_URL)",
    )
    parser.add_argument("--bootstrap-servers", help="Kafka brokers (KAFKA_BOOTSTRAP_SERVERS)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    return parser


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
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # The stages import-chat starts as child processes log as verbosely as their parent.
    inherited = os.environ.get("KHALA_VERBOSITY", "")
    verbosity = args.verbose or (
        int(inherited) if inherited.isascii() and inherited.isdigit() else 0
    )
    os.environ["KHALA_VERBOSITY"] = str(verbosity)
    ours = logging.WARNING - 10 * min(verbosity, 2)
    for name in ("khala_app", "khala_stream", "producers", "processors", "sinks"):
        logging.getLogger(name).setLevel(ours)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
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
    return replace(settings, **changes) if changes else settings


def run_async(coro: Any, *, on_signal: Callable[[], None] | None = None) -> Any:
    """The one place where the event loop starts; SIGTERM/SIGINT stop it (khala_app.lifecycle).

    `on_signal`: a long-running service's graceful stop, tried first.
    """
    from khala_app.lifecycle import run_until_signalled

    return run_until_signalled(coro, on_signal=on_signal)
