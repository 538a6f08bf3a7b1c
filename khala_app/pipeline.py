"""`import-chat` in one process: publish, process and sink until the export is applied.

A dry run takes another road on purpose: it reads the export into a scratch store and runs the
same derivation against the real database read-only, so it writes nothing anywhere and needs
no broker, yet reports exactly the counters a real run would (SPEC §4, §8.9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiokafka import AIOKafkaConsumer
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_app.guards import checked_export
from khala_app.publication import open_run, publish_run
from khala_stream import import_runs
from khala_stream.broker.clients import broker_session, make_consumer
from khala_stream.broker.loss import LossCheck
from khala_stream.config import Settings
from khala_stream.contract import (
    SOURCE_TABLES,
    DestinationTable,
    RowChange,
    RowUpsert,
    Topics,
    read_tables,
)
from khala_stream.contract.documents import document_hash, document_key, keyless_key
from khala_stream.contract.runs import PublishManifest
from khala_stream.db.engine import create_engine, init_db
from khala_stream.db.importer_tables import DOCUMENTS, IMPORTER, REFUSALS
from khala_stream.db.laravel_tables import LARAVEL
from khala_stream.db.port import Database, open_database
from khala_stream.errors import RuntimeFailure
from khala_stream.import_runs import RunOptions
from khala_stream.processes import PARENT_ENV
from khala_stream.progress import (
    PROGRESS_EVENTS_ENV,
    STORE_PHASE,
    WRITE_PHASE,
    PhaseDisplay,
    PhaseEvent,
    ProgressCallback,
)
from khala_stream.runtime import end_offsets
from processors import store
from processors.autopilots import parse_allowed_hosts
from processors.derive import (
    COUNTER_KEYS,
    DELETED_WITH,
    Derivation,
    PhaseProgress,
    RunContext,
    withheld_deletes,
)
from processors.identity import WorkosLookup
from processors.linkage import document_refs
from processors.lookups import MemoryUserIds, TargetView
from processors.workos import WorkosClient, WorkosUser
from processors.workos_cache import MemoryWorkosCache, SqlWorkosCache, resolve_with_cache
from producers.export_reader import ExportSource, RejectedLine
from producers.ledger import stored_hashes

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ImportReport:
    """Everything the summary prints (reference §7 plus the product's own lines)."""

    source: str
    options: RunOptions
    dry_run: bool
    sha256: str
    run_id: int | None = None
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_KEYS, 0))
    documents: dict[str, dict[str, int]] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_lines: list[tuple[str, int, str]] = field(default_factory=list)
    missing_key: dict[str, int] = field(default_factory=dict)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    ignored_tables: list[str] = field(default_factory=list)
    deletes_withheld: dict[str, str] = field(default_factory=dict)
    """--propagate-deletes: the tables that deleted nothing, and why."""

    def vanished_name(self, table: str) -> str:
        """What the documents of `table` missing from this export are called: they are
        deleted only with --propagate-deletes (and not from a table whose deletes are
        withheld), and a dry run deletes nothing."""
        if not self.options.propagate_deletes or table in self.deletes_withheld:
            return "not_in_export"
        return "would_delete" if self.dry_run else "deleted"

    def document_stats(self) -> dict[str, dict[str, int]]:
        """Per source table: inserted, updated, unchanged, and the vanished count under
        `vanished_name`; the text summary and --json both show these."""
        return {
            table: {
                "inserted": int(stats.get("inserted", 0)),
                "updated": int(stats.get("updated", 0)),
                "unchanged": int(stats.get("unchanged", 0)),
                self.vanished_name(table): int(stats.get("deleted", 0)),
            }
            for table, stats in self.documents.items()
        }

    def to_json(self) -> dict[str, Any]:
        dry = self.dry_run
        return {
            "source": self.source,
            "mode": "dry-run" if self.dry_run else "write",
            "replace": self.options.replace,
            "resolve_workos_users": self.options.resolve_workos_users,
            "import_blueprints": not self.options.skip_blueprints,
            "export_sha256": self.sha256,
            "run_id": self.run_id,
            "counters": self.counters,
            "documents": self.document_stats(),
            # A dry run writes nothing: what a real run would write is said as such.
            "rows_written": {} if dry else self.written,
            "rows_a_real_run_would_write": self.written if dry else {},
            "set_aside_in_dead_letter_topic": not dry,
            "rejected_lines": {
                "per_table": self.rejected,
                "lines": [{"file": f, "line": n, "reason": r} for f, n, r in self.rejected_lines],
            },
            "missing_key": self.missing_key,
            "refused_rows": [{"table": t, "key": k, "reason": r} for t, k, r in self.refused],
            "ignored_tables": self.ignored_tables,
            "deletes_withheld": self.deletes_withheld,
        }


async def import_chat(
    settings: Settings,
    source: Path,
    options: RunOptions,
    *,
    dry_run: bool = False,
    allow_empty: bool = False,
    progress: ProgressCallback | None = None,
    phases: PhaseDisplay | None = None,
    started: Callable[[], None] | None = None,
) -> ImportReport:
    """Import one export; raises KhalaError subclasses with their exit codes. An unreachable
    database or broker is waited for up to `settings.retry_deadline_s`; `allow_empty`: a
    --replace of an export without a single document (it empties the chat tables).

    `progress` hears the publisher's tables as they are read; `phases` is shown the stages'
    phases as they run (store, derive ..., write rows); `started` is called once the export,
    the database and the broker have been checked and the work begins."""
    # An invalid source fails here, before any write.
    async with checked_export(source, settings, options, allow_empty=allow_empty) as (
        export,
        workos,
    ):
        if dry_run:
            return await _dry_run(settings, export, options, workos, phases, started)
        return await _write_run(settings, export, options, progress, phases, started)


@contextlib.asynccontextmanager
async def _engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _write_run(
    settings: Settings,
    export: ExportSource,
    options: RunOptions,
    progress: ProgressCallback | None,
    phases: PhaseDisplay | None = None,
    started: Callable[[], None] | None = None,
) -> ImportReport:
    async with (
        open_database(settings.database_url, deadline_s=settings.retry_deadline_s) as db,
        broker_session(settings) as live,
    ):
        run_id = await open_run(live, db, export, options)

        def report() -> Awaitable[ImportReport]:
            return db.run(_report, export, options, run_id)

        if started is not None:
            started()
        return await _run_stages(live, db, export, run_id, options, progress, report, phases)


async def _run_stages(
    settings: Settings,
    db: Database,
    export: ExportSource,
    run_id: int,
    options: RunOptions,
    progress: ProgressCallback | None,
    then: Callable[[], Awaitable[ImportReport]],
    phases: PhaseDisplay | None = None,
) -> ImportReport:
    """Publish here while `process` and `sink` run as child processes (one core each), until
    the sink has applied the run; then `then()`, while the stages stop."""
    topics = Topics(settings.topic_prefix)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "KHALA_TOPIC_PREFIX": settings.topic_prefix,
        "KHALA_TOPIC_PARTITIONS": str(settings.kafka.partitions),
        "KHALA_TRIM_CONSUMED": "1" if settings.kafka.trim_consumed else "0",
        "DATABASE_URL": settings.database_url,
        "KHALA_RETRY_DEADLINE_SECONDS": str(max(1, round(settings.retry_deadline_s))),
        PARENT_ENV: str(os.getpid()),  # they stop by themselves if this process dies
    }
    if phases is not None:  # the stages tell their progress on stdout, shown here
        env[PROGRESS_EVENTS_ENV] = "1"
    stages = [
        await _start_stage(name, env, events=phases is not None) for name in ("process", "sink")
    ]
    published: dict[str, int] = {}  # the documents the store will hold: its phase's total
    relays = [
        asyncio.ensure_future(_relay_progress(child, phases, published))
        for _, child in stages
        if phases is not None
    ]
    terminated = False
    probe = make_consumer(settings.kafka, group_id=None)

    async def publish(applied: dict[str, int] | None = None) -> int:
        """Publish (again); the number of documents sent."""
        shown = progress if applied is None else None
        report = await publish_run(
            settings, db, export, run_id, options, progress=shown, applied=applied
        )
        return sum(report.published.values())

    try:
        await probe.start()
        sent = published["documents"] = await publish()
        if phases is not None:
            phases.update(PhaseEvent(STORE_PHASE, total=sent))
        loss_check = LossCheck()
        loss_check.due()  # the first look one interval from now: the stages are just starting
        while True:
            for name, child in stages:
                if child.returncode is not None:
                    raise RuntimeFailure(
                        f"the {name} stage exited with code {child.returncode} before the"
                        " import finished (its error is above); rerun to resume"
                    )
            if await db.run(_applied, run_id, topics):
                for _, child in stages:
                    child.terminate()  # they stop (waited for below) while `then` runs
                terminated = True
                report = await then()
                if phases is not None:
                    # All stored and applied by now; the stages' last events may be in flight.
                    rows = sum(report.written.values())
                    phases.update(PhaseEvent(STORE_PHASE, done=sent, total=sent, finished=True))
                    phases.update(PhaseEvent(WRITE_PHASE, done=rows, total=rows, finished=True))
                    phases.finish_all()
                return report
            if loss_check.due():
                applied = await db.run(_documents_lost, probe, topics, run_id)
                if applied is not None:
                    logger.warning(
                        "run %d: the broker lost documents it had acknowledged (the store holds"
                        " %s); publishing the missing ones again",
                        run_id,
                        applied,
                    )
                    await publish(applied)
            await asyncio.sleep(0.1)
    finally:
        await probe.stop()
        await asyncio.gather(*(_stop_stage(child, terminated) for _, child in stages))
        await asyncio.gather(*relays, return_exceptions=True)


async def _documents_lost(
    engine: AsyncEngine, probe: AIOKafkaConsumer, topics: Topics, run_id: int
) -> dict[str, int] | None:
    """What the store holds of the run when the broker lost documents it had acknowledged.

    That is the case when the run is published (every document acknowledged), the processor
    has read every partition of a table's topic to its end, and the store still holds fewer of
    that table's documents than were announced: they will never arrive. None otherwise.
    """
    run = await import_runs.load(engine, run_id)
    if run is None or run.status != "published" or run.manifest is None:
        return None
    announced = run.manifest.published
    async with engine.connect() as conn:
        applied = await store.applied_counts(conn, run_id)
    short = [t for t, n in announced.items() if applied.get(t, 0) < n]
    if not short:
        return None
    for table in short:
        topic = topics.source(table)
        positions = await import_runs.stored_positions(engine, topics.processor_group, topic)
        if not import_runs.reached(positions, await end_offsets(probe, topic)):
            return None
    # Counted again: the positions commit with the documents they carry, and the counts read
    # above may be older than the positions just read (the processor went on in between).
    async with engine.connect() as conn:
        applied = await store.applied_counts(conn, run_id)
    return applied if any(applied.get(t, 0) < announced[t] for t in short) else None


async def _applied(engine: AsyncEngine, run_id: int, topics: Topics) -> bool:
    run = await import_runs.load(engine, run_id)
    if run is not None and run.status == "superseded":
        raise import_runs.Superseded(run_id)
    return run is not None and await import_runs.applied_by_sink(
        engine, run, topics.sink_group, topics.changes
    )


async def _start_stage(
    name: str, env: dict[str, str], *, events: bool = False
) -> tuple[str, asyncio.subprocess.Process]:
    """`events`: its stdout is a pipe of progress events (`_relay_progress` reads it)."""
    out = asyncio.subprocess.PIPE if events else asyncio.subprocess.DEVNULL
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "khala_app", name, env=env, stdout=out
    )
    return name, child


_STAGE_STOP_S = 5.0
"""How long a stage child may take to stop on SIGTERM (it cancels its work after
khala_app.lifecycle.STOP_GRACE_S) before SIGKILL: the whole import stops within 10 s."""


async def _relay_progress(
    child: asyncio.subprocess.Process, phases: PhaseDisplay | None, published: dict[str, int]
) -> None:
    """Show a stage's progress events until its stdout closes (read to the end, so that the
    stage never blocks on a full pipe). The store is done once it holds what was published."""
    if child.stdout is None or phases is None:
        return
    async for raw in child.stdout:
        event = PhaseEvent.parse(raw.decode(errors="replace"))
        if event is None:
            continue
        total = published.get("documents")
        if event.phase == STORE_PHASE and total is not None and (event.done or 0) >= total:
            event = PhaseEvent(STORE_PHASE, event.done, total, finished=True)
        phases.update(event)


async def _stop_stage(child: asyncio.subprocess.Process, terminated: bool = False) -> None:
    """SIGTERM asks for a stop at the next batch boundary; SIGKILL if it does not come.

    One SIGTERM only: a second one can reach the stage while its event loop closes, between
    closing the signal wake-up pipe and removing the handler, and Python prints a traceback.
    """
    if child.returncode is None and not terminated:
        child.terminate()
    if child.returncode is None:
        try:
            await asyncio.wait_for(child.wait(), timeout=_STAGE_STOP_S)
        except TimeoutError:
            child.kill()
            await child.wait()


async def _report(
    engine: AsyncEngine, export: ExportSource, options: RunOptions, run_id: int
) -> ImportReport:
    run = await import_runs.load(engine, run_id)
    assert run is not None and run.manifest is not None and run.summary is not None
    report = ImportReport(
        source=str(export.path),
        options=options,
        dry_run=False,
        sha256=run.export_sha256,
        run_id=run_id,
    )
    _fill_from_published(report, run.manifest)
    for key in COUNTER_KEYS:
        if not key.startswith("source_"):
            report.counters[key] = run.summary.counters.get(key, 0)
    report.documents = run.summary.documents
    report.written = run.summary.written
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(REFUSALS.c.dest_table, REFUSALS.c.row_key, REFUSALS.c.reason)
            .where(REFUSALS.c.run_id == run_id)
            .order_by(REFUSALS.c.id)
        )
        report.refused = [(t, k, r) for t, k, r in rows.all()]
    report.written = _not_refused(report.written, report.refused)
    return report


def _not_refused(written: dict[str, int], refused: list[tuple[str, str, str]]) -> dict[str, int]:
    """The rows written per table, without those the database refused: they have a line of
    their own, and were not written."""
    left = dict(written)
    for table, _, _ in refused:
        left[table] = left.get(table, 0) - 1
    return {table: n for table, n in left.items() if n > 0}


def _fill_from_published(report: ImportReport, manifest: PublishManifest) -> None:
    for table in SOURCE_TABLES:
        report.counters[f"source_{table}"] = manifest.source.get(table, 0)
    report.rejected = manifest.rejected
    report.missing_key = manifest.missing_key
    report.rejected_lines = manifest.rejected_lines
    report.ignored_tables = manifest.ignored_tables
    if report.options.propagate_deletes:
        tables = read_tables(report.options.skip_blueprints)
        report.deletes_withheld = withheld_deletes(manifest, tables)


# -- dry run ---------------------------------------------------------------------------------


class _Discard:
    """A dry run's change output: counted, never sent."""

    def __init__(self) -> None:
        self.count = 0

    async def emit(self, changes: Sequence[RowChange]) -> None:
        self.count += len(changes)

    async def emit_rows(
        self, table: DestinationTable, rows: Sequence[RowUpsert], *, new: bool = False
    ) -> None:
        self.count += len(rows)

    async def drain(self) -> dict[int, int]:
        return {}


async def _dry_run(
    settings: Settings,
    export: ExportSource,
    options: RunOptions,
    workos: WorkosClient | None,
    phases: PhaseDisplay | None = None,
    started: Callable[[], None] | None = None,
) -> ImportReport:
    report = ImportReport(
        source=str(export.path), options=options, dry_run=True, sha256=export.sha256()
    )
    async with _engine(settings.database_url) as real:
        tables = await Database(real, settings.retry_deadline_s).run(_table_names)
        if started is not None:
            started()
        has_laravel = all(t in tables for t in LARAVEL.tables)
        ledger = real if all(t in tables for t in IMPORTER.tables) else None
        with tempfile.TemporaryDirectory(prefix="khala-dry-run-") as scratch_dir:
            async with _engine(f"sqlite+aiosqlite:///{scratch_dir}/scratch.sqlite") as scratch:
                # A database without the Laravel tables reads as empty ones.
                await init_db(scratch, laravel=not has_laravel)
                view = real if has_laravel else scratch
                run_id = 0  # no real run has id 0: everything in the ledger is settled
                published = await _load_scratch(export, scratch, run_id, options, phases)
                _fill_from_published(report, published)
                report.documents = await _document_stats(
                    scratch, ledger, run_id, read_tables(options.skip_blueprints)
                )
                async with contextlib.AsyncExitStack() as stack:
                    lookup = None
                    if workos is not None:
                        key = settings.workos_api_key
                        assert key is not None
                        client = await stack.enter_async_context(
                            WorkosClient(api_key=key.reveal(), base_url=settings.workos_base_url)
                        )
                        lookup = _dry_run_workos(client, ledger)
                    with_ledger = ledger is not None and view is real
                    derivation = Derivation(
                        context=RunContext(
                            run_id=run_id,
                            snapshot_ms=export.snapshot_ms or 0,
                            allowed_hosts=parse_allowed_hosts(settings.l402_allowlist_hosts),
                            options=options,
                            withheld_deletes=report.deletes_withheld,
                        ),
                        documents=scratch,
                        view=TargetView(view, replace=options.replace, ledger=with_ledger),
                        user_ids=MemoryUserIds(view, ledger=with_ledger),
                        workos=lookup,
                        out=_Discard(),
                        progress=_derive_phases(phases),
                    )
                    result = await derivation.run()
    for name in COUNTER_KEYS:
        if not name.startswith("source_"):
            report.counters[name] = result.counters[name]
    report.written = result.written
    if options.propagate_deletes:
        # The scratch store holds this export only: what vanished is counted in the real
        # ledger, and a real run sends one delete per vanished document and row table.
        for table, stats in report.documents.items():
            if not stats["deleted"] or table in report.deletes_withheld:
                continue
            for target in DELETED_WITH[table]:
                report.written[target] = report.written.get(target, 0) + stats["deleted"]
    return report


async def _table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


def _dry_run_workos(client: WorkosClient, ledger: AsyncEngine | None) -> WorkosLookup:
    """Answers from the persistent cache when it has them; new answers stay in memory."""
    memory = MemoryWorkosCache()
    persistent = SqlWorkosCache(ledger) if ledger is not None else None

    async def lookup(ids: Sequence[str]) -> dict[str, WorkosUser | None]:
        answers = await persistent.get_many(ids) if persistent is not None else {}
        missing = [i for i in ids if i not in answers]
        if missing:
            fresh, _ = await resolve_with_cache(client, memory, missing)
            answers.update(fresh)
        return answers

    return lookup


def _derive_phases(phases: PhaseDisplay | None) -> PhaseProgress | None:
    if phases is None:
        return None

    def update(phase: str, done: int, total: int | None, finished: bool) -> None:
        phases.update(PhaseEvent(f"derive {phase}", done, total, finished))

    return update


async def _load_scratch(
    export: ExportSource,
    scratch: AsyncEngine,
    run_id: int,
    options: RunOptions,
    phases: PhaseDisplay | None = None,
) -> PublishManifest:
    """Read the export into the scratch store; count what a real publish would report."""
    source: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    missing: Counter[str] = Counter()
    lines: list[tuple[str, int, str]] = []
    for table in read_tables(options.skip_blueprints):
        batch: list[store.IncomingDocument] = []
        if phases is not None:
            phases.update(PhaseEvent(f"read {table}", 0))
        for item in export.iter_table(table):
            if isinstance(item, RejectedLine):
                rejected[table] += 1
                if len(lines) < 1000:
                    lines.append((item.entry, item.line, item.reason))
                continue
            source[table] += 1
            digest = document_hash(item.doc)
            key = document_key(table, item.doc, digest)
            if key is None:
                missing[table] += 1
                key = keyless_key(table, item.line, digest)  # as the publisher does
                if key is None:
                    continue
            thread_key, link_key, timeless = document_refs(table, key, item.doc)
            batch.append(
                store.IncomingDocument(
                    run_id=run_id,
                    table=table,
                    key=key,
                    line=item.line,
                    content_hash=digest,
                    doc_id=None,
                    raw=item.raw,
                    thread_key=thread_key,
                    link_key=link_key,
                    timeless=timeless,
                )
            )
            if len(batch) >= 2000:
                async with scratch.begin() as conn:
                    await store.apply_documents(conn, batch)
                batch = []
                if phases is not None:
                    phases.update(PhaseEvent(f"read {table}", source[table]))
        async with scratch.begin() as conn:
            await store.apply_documents(conn, batch)
        if phases is not None:
            n = source[table]
            phases.update(PhaseEvent(f"read {table}", n, n, finished=True))
    return PublishManifest(
        run_id=run_id,
        export_sha256=export.sha256(),
        source=dict(source),
        rejected=dict(rejected),
        missing_key=dict(missing),
        rejected_lines=lines,
        tables=sorted(t for t in export.tables if t in SOURCE_TABLES),
        ignored_tables=sorted(t for t in export.tables if t not in SOURCE_TABLES),
    )


async def _document_stats(
    scratch: AsyncEngine, ledger: AsyncEngine | None, run_id: int, tables: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Inserted / updated / unchanged / vanished documents of `tables`, against the real
    ledger."""
    c = DOCUMENTS.c
    stats: dict[str, dict[str, int]] = {}
    for table in tables:
        counts = {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
        last = ""
        while True:
            async with scratch.connect() as conn:
                page = (
                    await conn.execute(
                        sa.select(c.doc_key, c.content_hash)
                        .where(c.source_table == table, c.export_seq == run_id, c.doc_key > last)
                        .where(store.keyed(c.doc_key))
                        .order_by(c.doc_key)
                        .limit(2000)
                    )
                ).all()
            if not page:
                break
            last = page[-1][0]
            known = await stored_hashes(ledger, table, [k for k, _ in page]) if ledger else {}
            for key, digest in page:
                previous = known.get(key)
                kind = (
                    "inserted"
                    if previous is None
                    else "unchanged"
                    if previous == digest
                    else "updated"
                )
                counts[kind] += 1
        if ledger is not None:
            async with ledger.connect() as conn:
                total = await conn.scalar(
                    sa.select(sa.func.count())
                    .select_from(DOCUMENTS)
                    .where(c.source_table == table)
                    .where(store.keyed(c.doc_key))
                )
            counts["deleted"] = int(total or 0) - counts["updated"] - counts["unchanged"]
        stats[table] = counts
    return stats
