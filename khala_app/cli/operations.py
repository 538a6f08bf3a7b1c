"""What an operator runs while an import goes: `lag`, `counts`, and the stages' `--metrics-port`.

`register(sub)` adds the `lag` and `counts` subcommands; `add_metrics_flags(parser)` and
`stage_metrics(...)` give a stage its Prometheus endpoint (SPEC §6). Heavy imports happen inside
the functions, as in `commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from khala_stream.config import Settings
from khala_stream.errors import RuntimeFailure, UsageError

if TYPE_CHECKING:
    from rich.table import Table

    from khala_stream.lag import LagReport
    from khala_stream.lag.source import SourceLag
    from khala_stream.metrics import MetricsServer, Stage

__all__ = [
    "add_metrics_flags",
    "counts",
    "lag",
    "lag_lines",
    "register",
    "stage_metrics",
]

_ONE_SHOT_SAMPLES: Final = 5
_ONE_SHOT_INTERVAL_S: Final = 1.0
_WATCH_WINDOW: Final = 10
_WATCH_INTERVAL_S: Final = 2.0
_EXPORT_INTERVAL_S: Final = 5.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lag",
        help="consumer lag per group, topic and partition, with a Burrow-style status",
        description=(
            "Samples the committed and end offsets of the process and sink groups, then shows "
            "lag in messages and seconds, the time to drain at the current rate and a status "
            "(OK, WARN, STALL, STOP, REWIND) judged over the window of samples as Burrow does."
        ),
    )
    p.add_argument("--group", help="only this group: process, sink, or a full group name")
    p.add_argument(
        "--partitions",
        action="store_true",
        help="also show each group's partitions as a table (default: one line per group)",
    )
    p.add_argument("--watch", action="store_true", help="keep sampling and redraw")
    p.add_argument(
        "--samples",
        type=int,
        help=f"samples to judge over, at least 1: one-shot burst (default {_ONE_SHOT_SAMPLES}), "
        f"or the sliding window with --watch (default {_WATCH_WINDOW})",
    )
    p.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help=f"seconds between samples, above 0 (default {_ONE_SHOT_INTERVAL_S:g}, "
        f"{_WATCH_INTERVAL_S:g} with --watch)",
    )
    add_metrics_flags(p)
    p.add_argument("--json", action="store_true", help="JSON (one object per line with --watch)")
    _add_check_flags(p)
    p.set_defaults(handler=lag)

    p = sub.add_parser(
        "counts",
        help="the runbook's before/after row counts, linkage counts included",
        description=(
            "Counts the Laravel tables and the chat rows linked to an autopilot. Save one "
            "snapshot before an import (counts --json > before.json), then run "
            "counts --before before.json after it to see exactly what changed."
        ),
    )
    p.add_argument("--before", type=Path, metavar="FILE", help="a snapshot saved earlier")
    p.add_argument("--save", type=Path, metavar="FILE", help="also write this snapshot to FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=counts)


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    from khala_stream.lag.check import DEFAULT_CRIT_SECONDS, DEFAULT_WARN_SECONDS

    check = p.add_argument_group(
        "monitoring check",
        "--check prints one line (LAG OK|WARNING|CRITICAL|UNKNOWN - ...) and exits 0 OK, "
        "1 WARNING (a Burrow WARN, or a warning limit reached), 2 CRITICAL (STOP, STALL, "
        "REWIND, or a critical limit reached), 3 UNKNOWN (broker unreachable, bad options), "
        "as Nagios-style checks and cron expect",
    )
    check.add_argument("--check", action="store_true", help="judge the lag as a monitoring check")
    check.add_argument(
        "--warn-seconds",
        type=float,
        default=DEFAULT_WARN_SECONDS,
        metavar="S",
        help=f"WARNING when a group's oldest unconsumed message is S seconds old or more "
        f"(default {DEFAULT_WARN_SECONDS:g}; >= 0)",
    )
    check.add_argument(
        "--crit-seconds",
        type=float,
        default=DEFAULT_CRIT_SECONDS,
        metavar="S",
        help=f"CRITICAL at S seconds or more (default {DEFAULT_CRIT_SECONDS:g}, as the "
        "KhalaLagTooOld alert; >= --warn-seconds)",
    )
    check.add_argument(
        "--warn-lag",
        type=int,
        metavar="N",
        help="WARNING when a group's total lag is N messages or more (default: no limit; >= 0)",
    )
    check.add_argument(
        "--crit-lag",
        type=int,
        metavar="N",
        help="CRITICAL at N messages or more (default: no limit; >= --warn-lag)",
    )


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    """`--metrics-port` (off by default) and `--metrics-host` for a long-running command."""
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, a port between 0 and 65535"
        " (default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 in a container)",
    )


@contextlib.asynccontextmanager
async def stage_metrics(
    args: argparse.Namespace, settings: Settings, stage: Stage | None
) -> AsyncIterator[MetricsServer | None]:
    """Serve the metrics while the block runs, if `--metrics-port` was given.

    `settings` must name a reachable broker (inside `broker_session`). The process and sink
    stages also sample their own group's lag into the lag gauges; `stage=None` (the one-shot
    `import-chat`) samples both groups. Raises UsageError when the port cannot be bound.
    """
    port: int | None = getattr(args, "metrics_port", None)
    if port is None:
        yield None
        return
    from khala_stream.lag import lag_metrics, prefix_groups

    server = _serve(port, getattr(args, "metrics_host", "127.0.0.1"))
    groups = [] if stage == "publish" else prefix_groups(settings.topic_prefix, stage)
    try:
        async with lag_metrics(settings.kafka, groups, interval_s=_EXPORT_INTERVAL_S):
            yield server
    finally:
        server.close()


@contextlib.contextmanager
def metrics_server(args: argparse.Namespace) -> Iterator[MetricsServer | None]:
    """Serve the metrics while the block runs, if `--metrics-port` was given (a command that
    is no stage: `follow`). Raises UsageError when the port cannot be bound."""
    port: int | None = getattr(args, "metrics_port", None)
    if port is None:
        yield None
        return
    server = _serve(port, getattr(args, "metrics_host", "127.0.0.1"))
    try:
        yield server
    finally:
        server.close()


def _serve(port: int, host: str) -> MetricsServer:
    from khala_stream import metrics

    if not 0 <= port <= 65535:
        raise UsageError(f"--metrics-port must be between 0 and 65535, not {port}")
    try:
        return metrics.serve(port, host=host)
    except OSError as exc:
        raise UsageError(f"--metrics-port {port}: cannot listen on {host}: {exc}") from exc


# ------------------------------------------------------------------ lag
def lag(args: argparse.Namespace, settings: Settings) -> int:
    if args.check:
        return _check(args, settings)
    from khala_app.cli import run_async

    samples: int | None = args.samples
    interval: float | None = args.interval
    if samples is not None and samples < 1:
        raise UsageError("--samples must be at least 1")
    if interval is not None and not 0 < interval < math.inf:  # nan fails both
        raise UsageError("--interval must be a number of seconds above 0")
    if args.metrics_port is not None and not args.watch:
        raise UsageError("--metrics-port needs --watch (a one-shot lag exits at once)")
    if args.watch:
        run_async(
            watch_lag(
                settings,
                group=args.group,
                window=samples or _WATCH_WINDOW,
                interval_s=interval or _WATCH_INTERVAL_S,
                as_json=args.json,
                partitions=args.partitions,
                metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
            )
        )
        return 0
    from khala_stream.lag.source import source_lag

    report: LagReport = run_async(
        one_shot_lag(
            settings,
            group=args.group,
            samples=samples or _ONE_SHOT_SAMPLES,
            interval_s=interval or _ONE_SHOT_INTERVAL_S,
        )
    )
    # A followed deployment (`follow`) shows beside the groups: how far behind, how fresh.
    source = run_async(source_lag(settings.database_url))
    data = report.to_json()
    lines = lag_lines(report, partitions=args.partitions)
    if source is not None:
        data["source"] = source.to_json()
        lines.append(source.line())
    _print(args.json, data, lines)
    return 0


def _check(args: argparse.Namespace, settings: Settings) -> int:
    """`lag --check`: one plugin line on stdout; anything that stops the check is UNKNOWN."""
    from khala_app.cli import run_async
    from khala_stream.errors import KhalaError
    from khala_stream.lag import CheckResult, Thresholds, check_report, unknown

    limits = Thresholds(
        warn_seconds=args.warn_seconds,
        crit_seconds=args.crit_seconds,
        warn_lag=args.warn_lag,
        crit_lag=args.crit_lag,
    )
    problems = limits.problems()
    if args.watch:
        problems.append("--check judges one burst of samples; it does not take --watch")
    if args.metrics_port is not None:
        problems.append("--check does not serve metrics (--metrics-port)")
    if args.samples is not None and args.samples < 1:
        problems.append("--samples must be at least 1")
    if args.interval is not None and not 0 < args.interval < math.inf:
        problems.append("--interval must be a number of seconds above 0")
    result: CheckResult
    report: LagReport | None = None
    if problems:
        result = unknown("; ".join(problems))
    else:
        try:
            taken: LagReport = run_async(
                one_shot_lag(
                    settings,
                    group=args.group,
                    samples=args.samples or _ONE_SHOT_SAMPLES,
                    interval_s=args.interval or _ONE_SHOT_INTERVAL_S,
                )
            )
        except (KhalaError, RuntimeError, OSError) as exc:
            # RuntimeError: the embedded broker did not start.
            result = unknown(str(exc))
        else:
            from khala_stream.lag.source import source_lag

            source = run_async(source_lag(settings.database_url))
            behind = None if source is None else source.behind_s
            report, result = taken, check_report(taken, limits, source_behind_s=behind)
    if args.json:
        data: dict[str, Any] = {
            "state": result.state,
            "exit_code": result.exit_code,
            "summary": result.summary,
            "report": None if report is None else report.to_json(),
        }
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        sys.stdout.write(result.summary + "\n")
    return result.exit_code


async def one_shot_lag(
    settings: Settings, *, group: str | None, samples: int, interval_s: float
) -> LagReport:
    from aiokafka.errors import KafkaError

    from khala_stream.broker.clients import broker_session
    from khala_stream.lag import prefix_groups, snapshot

    async with broker_session(settings) as live:
        groups = prefix_groups(live.topic_prefix, group)
        try:
            return await snapshot(live.kafka, groups, samples=samples, interval_s=interval_s)
        except (KafkaError, OSError) as exc:
            raise RuntimeFailure(f"cannot read consumer offsets from the broker: {exc}") from exc


async def watch_lag(
    settings: Settings,
    *,
    group: str | None,
    window: int,
    interval_s: float,
    as_json: bool,
    partitions: bool = False,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    rounds: int | None = None,
) -> None:
    """Sample every `interval_s`, judge the sliding window, redraw; `rounds` bounds it (tests)."""
    from aiokafka.errors import KafkaError

    from khala_stream.broker.clients import broker_session
    from khala_stream.lag import LagSampler, export_report, prefix_groups
    from khala_stream.lag.source import source_lag

    server = _serve(metrics_port, metrics_host) if metrics_port is not None else None
    live_display = sys.stdout.isatty() and not as_json
    previous: LagReport | None = None
    try:
        async with broker_session(settings) as live:
            groups = prefix_groups(live.topic_prefix, group)
            try:
                async with LagSampler(live.kafka, groups, window=window) as sampler:
                    with _Screen(live_display, partitions) as screen:
                        done = 0
                        while rounds is None or done < rounds:
                            if done:
                                await asyncio.sleep(interval_s)
                            done += 1
                            try:
                                await sampler.sample()
                                report = await sampler.report()
                            except (KafkaError, OSError) as exc:
                                # Keep watching: the broker may come back.
                                print(f"khala-stream: lag sample failed: {exc}", file=sys.stderr)
                                continue
                            if server is not None:
                                export_report(report, previous=previous)
                            previous = report
                            screen.show(report, as_json, await source_lag(live.database_url))
            except (KafkaError, OSError) as exc:
                raise RuntimeFailure(f"cannot reach the broker: {exc}") from exc
    finally:
        if server is not None:
            server.close()


class _Screen:
    """Redraws in place on a terminal (rich Live); appends plain blocks otherwise."""

    def __init__(self, live: bool, partitions: bool) -> None:
        self._live_enabled = live
        self._partitions = partitions
        self._live: Any = None

    def __enter__(self) -> _Screen:
        if self._live_enabled:
            from rich.live import Live

            self._live = Live(auto_refresh=False, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def show(self, report: LagReport, as_json: bool, source: SourceLag | None = None) -> None:
        """One redraw: the groups, and the followed deployment's line when there is one."""
        if as_json:
            data = report.to_json()
            if source is not None:
                data["source"] = source.to_json()
            sys.stdout.write(orjson.dumps(data).decode() + "\n")
        elif self._live is not None:
            from rich.console import Group
            from rich.text import Text

            table = _rich_table(report, self._partitions)
            shown = table if source is None else Group(table, Text(source.line()))
            self._live.update(shown, refresh=True)
        elif self._partitions:
            extra = [] if source is None else [source.line()]
            sys.stdout.write("\n".join([*lag_lines(report, partitions=True), *extra, ""]) + "\n")
        elif source is not None:
            sys.stdout.write("\n".join([*lag_lines(report), source.line()]) + "\n")
        else:
            sys.stdout.write("\n".join(lag_lines(report)) + "\n")
        sys.stdout.flush()


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 100:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}/s"


_COLUMNS: Final = ("topic", "part", "committed", "end", "lag", "lag_s", "rate", "drain", "status")


def _partition_rows(report: LagReport) -> list[tuple[str, list[tuple[str, ...]]]]:
    out: list[tuple[str, list[tuple[str, ...]]]] = []
    for g in report.groups:
        header = (
            f"{g.group}: {g.status} (lag {g.total_lag}, oldest {_seconds(g.max_lag_seconds)}, "
            f"rate {_rate(g.rate)}, drain {_seconds(g.time_to_drain)}, "
            f"window {g.complete:.0%} full)"
            if g.partitions
            else f"{g.group}: {g.status}"
        )
        rows: list[tuple[str, ...]] = [
            (
                p.topic,
                str(p.partition),
                "-" if p.committed is None else str(p.committed),
                str(p.end),
                str(p.lag),
                _seconds(p.lag_seconds),
                _rate(p.rate),
                _seconds(p.time_to_drain),
                p.status,
            )
            for p in g.partitions
        ]
        out.append((header, rows))
    return out


def lag_lines(report: LagReport, *, partitions: bool = False) -> list[str]:
    """The report as plain text: a line per group; with `partitions`, a title and each group's
    partitions as an aligned table under its line."""
    if not partitions:
        return [header for header, _ in _partition_rows(report)]
    lines = [f"consumer lag over {report.samples} samples"]
    for header, rows in _partition_rows(report):
        lines.append(header)
        if not rows:
            lines.append("  (no partitions: the group's topics do not exist yet)")
            continue
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
        lines.append(
            "  " + "  ".join(c.upper().ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))
        )
        for row in rows:
            lines.append(
                "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            )
    return lines


def _rich_table(report: LagReport, partitions: bool) -> Table:
    from rich.table import Table

    styles = {"OK": "green", "WARN": "yellow", "STALL": "red", "STOP": "red", "REWIND": "magenta"}
    table = Table(title=f"consumer lag over {report.samples} samples", expand=False)
    for column in ("group / topic", *_COLUMNS[1:]):
        table.add_column(column, justify="left" if column[0] in "gs" else "right")
    for g, (_, rows) in zip(report.groups, _partition_rows(report), strict=True):
        colour = styles.get(g.status, "white")
        table.add_row(
            f"[bold]{g.group}",
            "",
            "",
            "",
            f"[bold]{g.total_lag}",
            f"[bold]{_seconds(g.max_lag_seconds)}",
            _rate(g.rate),
            _seconds(g.time_to_drain),
            f"[bold {colour}]{g.status}",
        )
        if not partitions:
            continue
        for row in rows:
            table.add_row(f"  {row[0]}", *row[1:-1], f"[{styles.get(row[-1], 'white')}]{row[-1]}")
        table.add_section()
    return table


# ------------------------------------------------------------------ counts
def counts(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.cli import run_async
    from khala_app.counts import diff, load_snapshot

    before = load_snapshot(args.before) if args.before is not None else None
    _require_database(settings.database_url)
    after = run_async(_snapshot(settings.database_url))
    if args.save is not None:
        try:
            args.save.write_bytes(orjson.dumps(after.to_json(), option=orjson.OPT_INDENT_2))
        except OSError as exc:
            raise UsageError(f"--save {args.save}: {exc.strerror or exc}") from exc
    if before is None:
        _print(args.json, after.to_json(), after.lines())
    else:
        changes = diff(before, after)
        _print(args.json, changes.to_json(), changes.lines())
    return 0


def _require_database(url: str) -> None:
    # A read-only command must not create an empty SQLite file where none was.
    from khala_stream.db.engine import database_url

    parsed = database_url(url)  # a bad URL is exit 2 naming DATABASE_URL, as everywhere
    database = parsed.database or ""
    on_disk = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if on_disk and not Path(database).exists():
        raise UsageError(f"no database at {parsed.database} (DATABASE_URL); {_CREATE_IT}")


_CREATE_IT: Final = "run `khala-stream db init` or an import first"
_NO_SUCH_DATABASE: Final = "3D000"  # PostgreSQL's invalid_catalog_name


async def _snapshot(url: str) -> Any:
    from sqlalchemy.exc import DBAPIError

    from khala_app.counts import snapshot
    from khala_stream.db.engine import create_engine

    engine = create_engine(url)
    try:
        return await snapshot(engine)
    except Exception as exc:
        # asyncpg raises its own error, not wrapped, when the database does not exist.
        reason = getattr(exc, "orig", None) or exc
        _raise_if_no_database(url, reason)
        if not isinstance(exc, DBAPIError | OSError):
            raise
        raise RuntimeFailure(f"cannot count rows: {type(reason).__name__}: {reason}") from exc
    finally:
        await engine.dispose()


def _raise_if_no_database(url: str, reason: BaseException) -> None:
    """UsageError when `reason` says the server has no database of this name."""
    if getattr(reason, "sqlstate", None) == _NO_SUCH_DATABASE:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        raise UsageError(
            f"no database {name!r} on the server (DATABASE_URL); {_CREATE_IT}"
        ) from None


def _print(as_json: bool, data: Any, lines: list[str]) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")
