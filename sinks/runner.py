"""The `sink` stage: changes topic → database, batch by batch, exactly once in effect.

Each poll's records become one `SqlSink.apply` call that moves this group's stored positions in
the same transaction; refused rows reach the dead-letter topic before their offsets move.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter

from aiokafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs, metrics, status
from khala_stream.config import Settings
from khala_stream.contract import Topics
from khala_stream.contract.codec import encode_change
from khala_stream.contract.dead_letters import DeadLetter
from khala_stream.db.importer_tables import ROWS
from khala_stream.db.statistics import Growth
from khala_stream.dead_letters import publish_dead_letters, set_aside_records
from khala_stream.progress import StageStatus, consumer_lag
from khala_stream.runtime import Batch, Retries, StageClients, StageRunner, Waiting
from sinks.screening import ScreenedChanges, screen_changes
from sinks.sql_sink import OffsetAdvance, Refusal, SqlSink

logger = logging.getLogger(__name__)


def refusal_letter(refusal: Refusal, export_sha256: str | None) -> DeadLetter:
    change, source = refusal.change, refusal.change.source
    return DeadLetter(
        stage="sink",
        reason_code="db_refused",
        reason=f"{change.table} {change.key!r}: {refusal.reason}",
        raw=encode_change(change),
        table=change.table,
        entry=f"{source.table}/documents.jsonl" if source else None,
        line=source.line if source else None,
        doc_id=source.doc_id if source else None,
        export_sha256=export_sha256,
        run_id=change.run_id,
    )


class SinkService:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        batch_records: int = 8,
        db_deadline_s: float = 300.0,
        status: StageStatus | None = None,
    ) -> None:
        """`status`: the stage's counters and progress (a periodic INFO line by default)."""
        self._settings = settings
        self.status = status or StageStatus("sink")
        self._engine = engine
        self._topics = Topics(settings.topic_prefix)
        self.name = "sink"
        self.group = self._topics.sink_group
        self.topics = [self._topics.changes]
        self.batch_records = batch_records
        self._retries = Retries(db_deadline_s)
        self._clients: StageClients | None = None
        self._sink = SqlSink(engine)
        self.refused = 0
        self._exports: dict[int, str | None] = {}
        # Run events are written by looking their ids up in the ledger, which the same import
        # fills (khala_stream/db/statistics.py).
        self._written = Growth(engine, lambda table: [ROWS.name, table])

    async def run(
        self, *, until_idle: bool = False, stop: asyncio.Event | None = None
    ) -> Waiting | None:
        """Run the stage (`khala_stream.runtime.StageRunner`); with `until_idle`, what is left
        for the processor (or the publisher), if anything, once the changes are applied."""
        runner: StageRunner[ScreenedChanges] = StageRunner(
            self, self._settings.kafka, self._engine, self._retries, stop
        )
        try:
            return await runner.run(until_idle=until_idle)
        finally:
            await self.status.stop()

    # ------------------------------------------------------------------ the Stage plug-in

    def decode(self, batch: Batch) -> ScreenedChanges:
        return screen_changes(batch)

    async def apply(
        self, screened: ScreenedChanges, batch: Batch
    ) -> dict[TopicPartition, int] | None:
        assert self._clients is not None, "the runner has not started the clients"
        producer = self._clients.producer
        changes, row_batches = screened.changes, screened.row_batches
        # What must not be applied is set aside, acknowledged before the positions move past it.
        await set_aside_records(producer, self._topics.dead_letters, screened.letters)
        offsets = [
            OffsetAdvance(
                self.group, tp.topic, tp.partition, records[0].offset, records[-1].offset + 1
            )
            for tp, records in batch.items()
        ]

        # Read before the batch's transaction: on SQLite that transaction holds the one write
        # lock, and a read on another connection (which begins IMMEDIATE) would wait on it.
        for run_id in {c.run_id for c in changes} | {b.batch.run_id for b in row_batches}:
            await self._export_of(run_id)

        async def set_aside(refused: list[Refusal]) -> None:
            letters = [refusal_letter(r, self._exports.get(r.change.run_id)) for r in refused]
            metrics.dead_letters("sink", "db_refused", len(refused))
            await publish_dead_letters(producer, self._topics.dead_letters, letters)
            self.refused += len(refused)
            for r in refused:
                logger.warning("row refused: %s %s: %s", r.change.table, r.change.key, r.reason)

        started = time.monotonic()
        result = await self._sink.apply(
            changes, batches=row_batches, offsets=offsets, on_refused=set_aside
        )
        if not result.applied:
            return None
        self._written.added(result.rows)
        handled = Counter(result.rows) + Counter(r.change.table for r in result.refused)
        metrics.record_batch("sink", handled, time.monotonic() - started)
        metrics.record_output("sink", result.rows)
        self.status.applied(sum(len(r) for r in batch.values()), sum(handled.values()))
        logger.debug("applied changes: %s", result.rows)
        return {tp: records[-1].offset + 1 for tp, records in batch.items()}

    async def applied(self, screened: ScreenedChanges, batch: Batch, seconds: float) -> None:
        await self._retries.database(self._written.refresh_if_due)

    def attach(self, clients: StageClients) -> None:
        self._clients = clients
        self.status.start(functools.partial(consumer_lag, clients.consumer))

    async def between(self, *, until_idle: bool) -> bool:
        return False  # the sink has no work besides its batches

    async def waiting(self) -> Waiting | None:
        return await status.waiting_for_process(self._engine)

    async def _export_of(self, run_id: int) -> str | None:
        """The export a run came from, for the dead letters' provenance."""
        if run_id not in self._exports:
            run = await import_runs.load(self._engine, run_id)
            self._exports[run_id] = run.export_sha256 if run else None
        return self._exports[run_id]
