"""The subcommands. Each builds what it needs from Settings and calls one public API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from khala_stream.config import Settings
from khala_stream.errors import RuntimeFailure
from khala_stream.terminal import printable

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from khala_stream.import_runs import RunOptions
    from khala_stream.progress import PhaseDisplay, ProgressCallback
    from khala_stream.runtime import Waiting
    from processors.runner import Processor
    from sinks.runner import SinkService


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("validate", help="check an export: size, sha256, tables, rejected lines")
    p.add_argument("export", type=Path, help="the export: a ZIP or a folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=validate)

    p = sub.add_parser("import-chat", help="import an export end to end (the reference command)")
    p.add_argument(
        "export", type=Path, nargs="?", help="ZIP or folder (default: the bundled sample)"
    )
    _import_flags(p)
    p.add_argument("--dry-run", action="store_true", help="compute everything, write nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=import_chat)

    p = sub.add_parser("publish", help="publish an export to the source topics (a stage)")
    p.add_argument("export", type=Path, help="the export: a ZIP or a folder")
    p.add_argument("--incremental", action="store_true", help="send only new or changed documents")
    _import_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=publish)

    p = sub.add_parser(
        "follow",
        help="follow a live Khala deployment: its snapshot, then its changes (KHALA_DEPLOY_KEY)",
    )
    p.add_argument("--deployment", required=True, metavar="URL", help="the deployment's URL")
    p.add_argument(
        "--tables",
        nargs="+",
        metavar="TABLE",
        help="source tables to follow (default: users threads runs messages receipts blueprints)",
    )
    p.add_argument(
        "--propagate-deletes",
        action="store_true",
        help="delete the rows of documents deleted at the source (default: report them only)",
    )
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit once everything the source reported is published",
    )
    p.add_argument(
        "--poll-interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="pause between polls once caught up, above 0 (default 1)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=follow)

    for name, handler, text in (
        ("process", process, "run the stream processors (a stage)"),
        ("sink", sink, "run the database sink (a stage)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--until-idle", action="store_true", help="exit once caught up")
        p.set_defaults(handler=handler)

    p = sub.add_parser("generate", help="write a synthetic export (deterministic per seed)")
    p.add_argument(
        "--out",
        type=_new_file,
        required=True,
        metavar="FILE.zip",
        help="where to write, in a folder that exists (a file there is replaced)",
    )
    p.add_argument(
        "--users",
        type=_at_least(0, most=10_000_000),
        default=20,
        help="users, between 0 and 10,000,000 (default 20)",
    )
    p.add_argument(
        "--seed",
        type=_at_least(0),
        default=1,
        help="random seed, 0 or more; the same seed writes the same export (default 1)",
    )
    p.add_argument(
        "--threads-per-user",
        type=_at_least(0, most=10_000),
        default=3,
        help="threads of each user, between 0 and 10,000 (default 3)",
    )
    p.add_argument(
        "--messages-per-thread",
        type=_at_least(0, most=10_000),
        default=8,
        help="messages of each thread, between 0 and 10,000 (default 8)",
    )
    p.add_argument(
        "--edge-cases", action="store_true", help="include the reference's edge cases (default: no)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=generate)

    db = sub.add_parser("db", help="database set-up").add_subparsers(
        dest="db_command", required=True
    )
    p = db.add_parser("init", help="create the missing Laravel and importer tables")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=db_init)

    dlq = sub.add_parser("dlq", help="what was set aside").add_subparsers(
        dest="dlq_command", required=True
    )
    p = dlq.add_parser("list", help="dead letters, grouped by reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=dlq_list)
    p = dlq.add_parser("replay", help="retry the rows the database refused")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=dlq_replay)

    from khala_app.cli import operations, status

    operations.register(sub)
    status.register(sub)
    for name in ("publish", "process", "sink", "follow"):
        operations.add_metrics_flags(sub.choices[name])


def _at_least(minimum: int, *, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `minimum` (to `most`), else a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,}, not {value}")
        return value

    return parse


def _new_file(text: str) -> Path:
    """An argparse type: a path to write a file to by renaming one over it, which would
    replace a device, a folder's entry or a link as readily as a file: so only a regular file
    or nothing may be there, in a folder that exists."""
    path = Path(text)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise argparse.ArgumentTypeError(f"{text} is there and is not a regular file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {path.parent}")
    return path


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0 (else a usage error, exit 2)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def follow(args: argparse.Namespace, settings: Settings) -> int:
    """`khala-stream follow` (khala_app/follow.py)."""
    from khala_app.follow import FollowOptions
    from khala_app.follow import follow as run_follow
    from khala_stream.contract.tables import SOURCE_TABLES

    options = FollowOptions(
        deployment=args.deployment,
        tables=tuple(args.tables) if args.tables else SOURCE_TABLES,
        propagate_deletes=args.propagate_deletes,
        until_caught_up=args.until_caught_up,
        poll_interval_s=args.poll_interval,
    )
    from khala_app.cli import operations

    with operations.metrics_server(args):
        report = _run(run_follow(settings, options))
    _emit(args, report.to_json(), report.lines(options.propagate_deletes))
    return 0


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replace", action="store_true", help="empty the six chat tables first")
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="let --replace or --propagate-deletes import an export without a single document"
        " (empties the tables)",
    )
    p.add_argument(
        "--resolve-workos-users",
        action="store_true",
        help="look up blank or invalid emails in WorkOS (WORKOS_API_KEY)",
    )
    p.add_argument("--skip-blueprints", action="store_true", help="do not read blueprints")
    p.add_argument(
        "--propagate-deletes",
        action="store_true",
        help="delete rows of documents that vanished from the export",
    )


def _run(coro: Any, *, on_signal: Callable[[], None] | None = None) -> Any:
    from khala_app.cli import run_async

    return run_async(coro, on_signal=on_signal)


def _emit(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    from khala_app.cli.render import print_json

    if getattr(args, "json", False):
        print_json(data)
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def validate(args: argparse.Namespace, settings: Settings) -> int:
    from producers.validation import validate_export

    report = validate_export(
        args.export,
        max_entry_bytes=settings.max_entry_bytes,
        max_ratio=settings.max_ratio,
        max_total_bytes=settings.max_total_bytes,
    )
    _emit(args, report.to_json(), report.lines())
    return 0


def _run_options(args: argparse.Namespace, *, incremental: bool) -> RunOptions:
    from khala_stream.import_runs import RunOptions

    return RunOptions(
        replace=args.replace,
        resolve_workos_users=args.resolve_workos_users,
        skip_blueprints=args.skip_blueprints,
        propagate_deletes=args.propagate_deletes,
        incremental=incremental,
    )


def import_chat(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.cli.render import header_lines, result_lines
    from khala_app.pipeline import import_chat as run_import
    from producers.sample import SAMPLE_EXPORT

    options = _run_options(args, incremental=True)
    source = args.export or SAMPLE_EXPORT

    def started() -> None:  # the opening lines as the work starts, not after it
        if not args.json:
            lines = header_lines(str(source), options, dry_run=args.dry_run)
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()

    with _phases(source) as (phases, progress):
        report = _run(
            run_import(
                settings,
                source,
                options,
                dry_run=args.dry_run,
                allow_empty=args.allow_empty,
                progress=progress,
                phases=phases,
                started=started,
            )
        )
    _emit(args, report.to_json(), result_lines(report))
    return 0


@contextlib.contextmanager
def _progress(source: Path, *, enabled: bool) -> Iterator[ProgressCallback | None]:
    """Progress bars per table on a terminal, log lines otherwise (on stderr)."""
    from khala_stream.progress import estimate_lines, table_progress
    from producers.export_reader import open_export

    if not enabled:
        yield None
        return
    with open_export(
        source, max_entry_bytes=1 << 62, max_ratio=1e12, max_total_bytes=1 << 62
    ) as export:
        estimates = estimate_lines(export.path, export.tables)
    with table_progress(estimates=estimates) as progress:
        yield progress


@contextlib.contextmanager
def _phases(source: Path) -> Iterator[tuple[PhaseDisplay, ProgressCallback]]:
    """Every phase of an import (publish per table, store, derive, write; a dry run's read
    and derive), on stderr: bars on a terminal, a line per phase and every few seconds
    otherwise."""
    from khala_stream.progress import estimate_lines, phase_progress, publish_callback
    from producers.export_reader import open_export

    with open_export(
        source, max_entry_bytes=1 << 62, max_ratio=1e12, max_total_bytes=1 << 62
    ) as export:
        estimates = estimate_lines(export.path, export.tables)
    with phase_progress() as display:
        yield display, publish_callback(display, estimates)


async def _publish(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The publication of `import-chat` on its own (khala_app/publication.py)."""
    from khala_app.cli import operations
    from khala_app.guards import checked_export
    from khala_app.publication import open_run, publish_run
    from khala_stream.broker.clients import broker_session
    from khala_stream.db.port import open_database

    options = _run_options(args, incremental=args.incremental)
    async with (
        checked_export(args.export, settings, options, allow_empty=args.allow_empty) as (export, _),
        open_database(settings.database_url, deadline_s=settings.retry_deadline_s) as db,
        broker_session(settings) as live,
        operations.stage_metrics(args, live, "publish"),
    ):
        run_id = await open_run(live, db, export, options)
        with _progress(args.export, enabled=True) as progress:
            report = await publish_run(live, db, export, run_id, options, progress=progress)
    return {"run_id": run_id, "export_sha256": report.sha256, **report.to_json()}


def publish(args: argparse.Namespace, settings: Settings) -> int:
    result = _run(_publish(args, settings))
    lines = [f"run {result['run_id']}: published export {result['export_sha256']}"]
    for table, n in sorted(result["published"].items()):
        unchanged = result["unchanged"].get(table, 0)
        lines.append(f"  {table}: {n} messages ({unchanged} unchanged)")
    _emit(args, result, lines)
    return 0


async def _stage(
    args: argparse.Namespace,
    settings: Settings,
    kind: Literal["process", "sink"],
    stop: asyncio.Event,
) -> Waiting | None:
    from khala_app.cli import operations
    from khala_app.topic_owner import prepare_topics_waiting
    from khala_stream.broker.clients import broker_session
    from khala_stream.db.engine import create_engine, init_db
    from khala_stream.db.port import Database
    from khala_stream.progress import StageStatus

    engine = create_engine(settings.database_url)
    deadline = settings.retry_deadline_s
    try:
        db = Database(engine, deadline)
        await db.run(init_db)
        async with broker_session(settings) as live, operations.stage_metrics(args, live, kind):
            await prepare_topics_waiting(live, db)
            # Each stage imports only its own side: `import-chat` starts both while it
            # publishes, on the same cores.
            service: Processor | SinkService
            status = StageStatus.from_env(kind, os.environ)
            if kind == "process":
                from processors.runner import Processor

                service = Processor(live, engine, db_deadline_s=deadline, status=status)
            else:
                from sinks.runner import SinkService

                service = SinkService(live, engine, db_deadline_s=deadline, status=status)
            return await service.run(until_idle=args.until_idle, stop=stop)
    finally:
        await engine.dispose()


def _stage_command(args: argparse.Namespace, settings: Settings, kind: Any) -> int:
    stop = asyncio.Event()  # a signal asks for a stop at a batch boundary first
    waiting = _run(_stage(args, settings, kind, stop), on_signal=stop.set)
    if waiting is not None:  # --until-idle: what is left needs another stage
        sys.stdout.write(waiting.line() + "\n")
    return 0


def process(args: argparse.Namespace, settings: Settings) -> int:
    return _stage_command(args, settings, "process")


def sink(args: argparse.Namespace, settings: Settings) -> int:
    return _stage_command(args, settings, "sink")


def generate(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from producers.generator import generate_export

    try:
        made = generate_export(
            args.out,
            users=args.users,
            seed=args.seed,
            threads_per_user=args.threads_per_user,
            messages_per_thread=args.messages_per_thread,
            edge_cases=args.edge_cases,
        )
    except OSError as exc:  # a full disk, a read-only folder: nothing is left half-written
        raise RuntimeFailure(f"cannot write {args.out}: {exc.strerror or exc}") from None
    from khala_stream.contract import SOURCE_TABLES

    # What the importer reads: the documents of the six source tables. The extra tables a
    # real export carries are written too, and ignored by the importer.
    read = sum(n for t, n in made.counts.items() if t in SOURCE_TABLES)
    extra = made.total_documents - read
    malformed = sum(made.malformed.values())
    data = {
        "out": str(args.out),
        "documents": read,
        "other_tables_documents": extra,
        **{k: v for k, v in asdict(made).items() if k != "path"},
    }
    line = f"wrote {args.out}: {read} documents for the importer"
    if malformed:
        line += f", {malformed} malformed lines"
    if extra:
        line += f" (and {extra} in other tables it ignores)"
    _emit(args, data, [line])
    return 0


def db_init(args: argparse.Namespace, settings: Settings) -> int:
    from khala_stream.db.engine import create_engine, init_db
    from khala_stream.runtime import with_retries

    async def go() -> list[str]:
        engine = create_engine(settings.database_url)
        try:
            return await with_retries(
                lambda: init_db(engine),
                what="the database",
                deadline_s=settings.retry_deadline_s,
            )
        finally:
            await engine.dispose()

    created = _run(go())
    _emit(
        args, {"created": created}, [f"created {name}" for name in created] or ["nothing to create"]
    )
    return 0


async def _with_dead_letters(
    settings: Settings, action: Any, *, writes: bool = True
) -> dict[str, Any]:
    """Run `action(kafka, engine, dead_letter_topic)` with a broker and the database.

    `writes`: the importer's tables are created first; otherwise (a listing) they are not,
    and `engine` is None when the database has none of them yet (nothing was replayed).
    """
    import sqlalchemy as sa

    from khala_stream.broker.clients import broker_session
    from khala_stream.contract import Topics
    from khala_stream.db.engine import create_engine, init_db
    from khala_stream.db.importer_tables import REPLAYED
    from khala_stream.runtime import with_retries

    async def has_replayed() -> bool:
        async with engine.connect() as conn:
            found: bool = await conn.run_sync(lambda c: sa.inspect(c).has_table(REPLAYED.name))
            return found

    engine = create_engine(settings.database_url)
    try:
        if writes:
            await with_retries(
                lambda: init_db(engine, laravel=False),
                what="the database",
                deadline_s=settings.retry_deadline_s,
            )
        asked: AsyncEngine | None = engine
        if not writes and not await with_retries(
            has_replayed, what="the database", deadline_s=settings.retry_deadline_s
        ):
            asked = None
        async with broker_session(settings) as live:
            # Reading the letters and applying them again are both safe to repeat.
            result: dict[str, Any] = await with_retries(
                lambda: action(live.kafka, asked, Topics(live.topic_prefix).dead_letters),
                what="the broker and the database",
                deadline_s=settings.retry_deadline_s,
            )
            return result
    finally:
        await engine.dispose()


def dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.cli.operations import _require_database
    from khala_app.dlq import pending_letters, provenance, run_sources, summarise

    async def listing(kafka: Any, engine: Any, topic: str) -> dict[str, Any]:
        letters = await pending_letters(kafka, engine, topic)
        sources = await run_sources(engine, letters) if engine is not None else {}
        return summarise(letters, sources)

    # A listing writes nothing: no SQLite file where none was, no tables.
    _require_database(settings.database_url)
    data = _run(_with_dead_letters(settings, listing, writes=False))
    lines = [f"{data['total']} dead letters waiting"]
    for code, n in sorted(data["by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{code}: {n}")
        mine = [d for d in data["letters"] if d["reason_code"] == code]
        lines += [
            f"  {printable(d['location'])}: {printable(d['reason'])} [{printable(provenance(d))}]"
            for d in mine[:20]
        ]
        if len(mine) > 20:
            lines.append(f"  ... and {len(mine) - 20} more (--json lists all)")
    _emit(args, data, lines)
    return 0


def dlq_replay(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.dlq import replay

    async def replaying(kafka: Any, engine: Any, topic: str) -> dict[str, Any]:
        return (await replay(kafka, engine, topic)).to_json()

    data = _run(_with_dead_letters(settings, replaying))
    lines = [
        f"retried {data['retried']} refused rows: {data['applied']} applied,"
        f" {len(data['still_refused'])} still refused",
        f"{data['not_retryable']} not retryable: bad source lines need a corrected export;"
        " records a stage set aside stay listed (see `dlq list`)",
    ]
    lines += [
        f"  {r['table']} {printable(r['key'])}: {printable(r['reason'])}"
        for r in data["still_refused"]
    ]
    _emit(args, data, lines)
    return 0 if not data["still_refused"] else 1
