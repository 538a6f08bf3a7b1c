"""The subcommands. Each builds what it needs from Settings and calls one public API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from khala_stream.config import Settings
from khala_stream.terminal import printable

if TYPE_CHECKING:
    from khala_stream.progress import ProgressCallback
    from processors.runner import Processor
    from sinks.runner import SinkService


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("validate", help="check an export: size, sha256, tables, rejected lines")
    p.add_argument("export", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=validate)

    p = sub.add_parser("import-chat", help="import an export end to end (the reference command)")
    p.add_argument(
        "export", type=Path, nargs="?", help="ZIP or folder (default: the bundled sample)"
    )
    _import_flags(p)
    p.add_argument("--dry-run", action="store_true", help="compute everything, write nothing")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--retry-deadline",
        type=_seconds,
        metavar="SECONDS",
        help="how long to wait for an unreachable database or broker"
        " (default KHALA_RETRY_DEADLINE_SECONDS, or 120)",
    )
    p.set_defaults(handler=import_chat)

    p = sub.add_parser("publish", help="publish an export to the source topics (a stage)")
    p.add_argument("export", type=Path)
    p.add_argument("--incremental", action="store_true", help="send only new or changed documents")
    _import_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=publish)

    for name, handler, text in (
        ("process", process, "run the stream processors (a stage)"),
        ("sink", sink, "run the database sink (a stage)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--until-idle", action="store_true", help="exit once caught up")
        p.set_defaults(handler=handler)

    p = sub.add_parser("generate", help="write a synthetic export (deterministic per seed)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--users", type=_count, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads-per-user", type=_count, default=3)
    p.add_argument("--messages-per-thread", type=_count, default=8)
    p.add_argument("--edge-cases", action="store_true", help="include the reference's edge cases")
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

    from khala_app.cli import operations

    operations.register(sub)
    for name in ("publish", "process", "sink"):
        operations.add_metrics_flags(sub.choices[name])


def _count(text: str) -> int:
    """A whole number of things, 0 or more (argparse: exit 2 with one line otherwise)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    """A finite number of seconds above 0 (argparse: exit 2 with one line otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replace", action="store_true", help="empty the six chat tables first")
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="let --replace import an export without a single document (empties the tables)",
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


def import_chat(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.cli.render import summary_lines
    from khala_app.pipeline import ImportOptions
    from khala_app.pipeline import import_chat as run_import
    from producers.sample import SAMPLE_EXPORT

    options = ImportOptions(
        dry_run=args.dry_run,
        replace=args.replace,
        resolve_workos_users=args.resolve_workos_users,
        skip_blueprints=args.skip_blueprints,
        propagate_deletes=args.propagate_deletes,
        allow_empty=args.allow_empty,
        deadline_s=args.retry_deadline or settings.retry_deadline_s,
    )
    source = args.export or SAMPLE_EXPORT
    with _progress(source, enabled=not args.dry_run) as progress:
        report = _run(run_import(settings, source, options, progress=progress))
    _emit(args, report.to_json(), summary_lines(report))
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


async def _publish(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from khala_app.cli import operations
    from khala_app.guards import check_workos_key, refuse_empty
    from khala_app.topic_owner import prepare_topics
    from khala_stream import import_runs
    from khala_stream.broker.clients import broker_session, make_producer
    from khala_stream.contract import Topics, read_tables
    from khala_stream.db.engine import create_engine, init_db
    from khala_stream.runtime import with_retries
    from producers.export_reader import open_export
    from producers.publisher import Publisher

    with open_export(
        args.export,
        max_entry_bytes=settings.max_entry_bytes,
        max_ratio=settings.max_ratio,
        max_total_bytes=settings.max_total_bytes,
    ) as export:
        export.verify(read_tables(args.skip_blueprints))
        # Before anything is written: the processor truncates first under --replace.
        if args.replace and not args.allow_empty:
            refuse_empty(export, read_tables(args.skip_blueprints))
        if args.resolve_workos_users:
            await check_workos_key(settings)
        engine = create_engine(settings.database_url)
        deadline = settings.retry_deadline_s
        try:
            # Waits for an unreachable database or broker as every stage does (README).
            await with_retries(lambda: init_db(engine), what="the database", deadline_s=deadline)
            async with (
                broker_session(settings) as live,
                operations.stage_metrics(args, live, "publish"),
            ):
                topics = Topics(live.topic_prefix)
                await with_retries(
                    lambda: prepare_topics(live.kafka, topics, engine),
                    what="the broker",
                    deadline_s=deadline,
                )
                flags = import_runs.RunFlags(
                    replace=args.replace,
                    skip_blueprints=args.skip_blueprints,
                    resolve_workos_users=args.resolve_workos_users,
                    propagate_deletes=args.propagate_deletes,
                    incremental=args.incremental,
                )
                run_id = await import_runs.register(
                    engine, source=str(export.path), sha256=export.sha256(), flags=flags
                )
                producer = make_producer(live.kafka)
                await producer.start()
                try:
                    with _progress(args.export, enabled=True) as progress:
                        report = await Publisher(
                            producer=producer,
                            engine=engine,
                            topics=topics,
                            incremental=args.incremental,
                            skip_blueprints=args.skip_blueprints,
                            progress=progress,
                        ).publish(export, run_id)
                finally:
                    await producer.stop()
        finally:
            await engine.dispose()
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
) -> None:
    from khala_app.cli import operations
    from khala_app.topic_owner import prepare_topics
    from khala_stream.broker.clients import broker_session
    from khala_stream.contract import Topics
    from khala_stream.db.engine import create_engine, init_db
    from khala_stream.runtime import with_retries

    engine = create_engine(settings.database_url)
    deadline = settings.retry_deadline_s
    try:
        await with_retries(lambda: init_db(engine), what="the database", deadline_s=deadline)
        async with broker_session(settings) as live, operations.stage_metrics(args, live, kind):
            await with_retries(
                lambda: prepare_topics(live.kafka, Topics(live.topic_prefix), engine),
                what="the broker",
                deadline_s=deadline,
            )
            # Each stage imports only its own side: `import-chat` starts both while it
            # publishes, on the same cores.
            service: Processor | SinkService
            if kind == "process":
                from processors.runner import Processor

                service = Processor(live, engine, db_deadline_s=deadline)
            else:
                from sinks.runner import SinkService

                service = SinkService(live, engine, db_deadline_s=deadline)
            await service.run(until_idle=args.until_idle, stop=stop)
    finally:
        await engine.dispose()


def process(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()  # a signal asks for a stop at a batch boundary first
    _run(_stage(args, settings, "process", stop), on_signal=stop.set)
    return 0


def sink(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    _run(_stage(args, settings, "sink", stop), on_signal=stop.set)
    return 0


def generate(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from producers.generator import generate_export

    made = generate_export(
        args.out,
        users=args.users,
        seed=args.seed,
        threads_per_user=args.threads_per_user,
        messages_per_thread=args.messages_per_thread,
        edge_cases=args.edge_cases,
    )
    data = {"out": str(args.out), **{k: v for k, v in asdict(made).items() if k != "path"}}
    _emit(args, data, [f"wrote {args.out}: {made.total_documents} documents"])
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


async def _with_dead_letters(settings: Settings, action: Any) -> dict[str, Any]:
    """Run `action(kafka, engine, dead_letter_topic)` with a broker and the database."""
    from khala_stream.broker.clients import broker_session
    from khala_stream.contract import Topics
    from khala_stream.db.engine import create_engine, init_db
    from khala_stream.runtime import with_retries

    engine = create_engine(settings.database_url)
    try:
        await with_retries(
            lambda: init_db(engine, laravel=False),
            what="the database",
            deadline_s=settings.retry_deadline_s,
        )
        async with broker_session(settings) as live:
            # Reading the letters and applying them again are both safe to repeat.
            result: dict[str, Any] = await with_retries(
                lambda: action(live.kafka, engine, Topics(live.topic_prefix).dead_letters),
                what="the broker and the database",
                deadline_s=settings.retry_deadline_s,
            )
            return result
    finally:
        await engine.dispose()


def dlq_list(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.dlq import pending_letters, summarise

    async def listing(kafka: Any, engine: Any, topic: str) -> dict[str, Any]:
        return summarise(await pending_letters(kafka, engine, topic))

    data = _run(_with_dead_letters(settings, listing))
    lines = [f"{data['total']} dead letters waiting"]
    for code, n in sorted(data["by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{code}: {n}")
        mine = [d for d in data["letters"] if d["reason_code"] == code]
        lines += [f"  {printable(d['location'])}: {printable(d['reason'])}" for d in mine[:20]]
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
