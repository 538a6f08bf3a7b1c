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

from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs, metrics
from khala_stream.broker.clients import Trimmer, make_consumer, make_producer
from khala_stream.config import Settings
from khala_stream.contract import Topics
from khala_stream.contract.codec import encode_change
from khala_stream.contract.dead_letters import DeadLetter
from khala_stream.db.importer_tables import ROWS
from khala_stream.db.statistics import Growth
from khala_stream.dead_letters import publish_dead_letters, set_aside_records
from khala_stream.progress import StageStatus, consumer_lag
from khala_stream.runtime import (
    Batch,
    Poller,
    StoredOffsets,
    caught_up,
    commit_for_lag,
    with_retries,
)
from sinks.screening import screen_changes
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
        self._sink = SqlSink(engine)
        self._batch_records = batch_records
        self._deadline = db_deadline_s
        self.refused = 0
        self._exports: dict[int, str | None] = {}
        # Run events are written by looking their ids up in the ledger, which the same import
        # fills (khala_stream/db/statistics.py).
        self._written = Growth(engine, lambda table: [ROWS.name, table])

    async def run(self, *, until_idle: bool = False, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        group, topic = self._topics.sink_group, self._topics.changes
        consumer = make_consumer(self._settings.kafka, group_id=group)
        stored = StoredOffsets(consumer, self._engine, group, deadline_s=self._deadline)
        consumer.subscribe([topic], listener=stored)
        producer = make_producer(self._settings.kafka)
        poller = Poller(consumer, self._batch_records, stored, stop)
        trimmer = Trimmer(self._settings.kafka)
        try:
            # Inside the try: a client that started is stopped (and leaves its group) when the
            # next one fails to start; stopping one that never started is harmless.
            await consumer.start()
            await producer.start()
            self.status.start(functools.partial(consumer_lag, consumer))
            while not stop.is_set():
                batch = await poller.poll()
                if not batch:
                    if until_idle and await caught_up(consumer):
                        break
                    continue
                applied = await with_retries(
                    functools.partial(self._apply, batch, producer),
                    what="the database",
                    deadline_s=self._deadline,
                )
                if applied:
                    await with_retries(
                        self._written.refresh_if_due, what="the database", deadline_s=self._deadline
                    )
                    positions = {tp: records[-1].offset + 1 for tp, records in batch.items()}
                    await commit_for_lag(consumer, positions)
                    await trimmer.consumed(positions)
                else:
                    await stored.reposition()
            await trimmer.consumed({}, now=True)  # stopping: what is applied, at once
        finally:
            await self.status.stop()
            await producer.stop()
            await consumer.stop()

    async def _apply(self, batch: Batch, producer: AIOKafkaProducer) -> bool:
        group = self._topics.sink_group
        screened = screen_changes(batch)
        changes, row_batches = screened.changes, screened.row_batches
        # What must not be applied is set aside, acknowledged before the positions move past it.
        await set_aside_records(producer, self._topics.dead_letters, screened.letters)
        offsets = [
            OffsetAdvance(group, tp.topic, tp.partition, records[0].offset, records[-1].offset + 1)
            for tp, records in batch.items()
        ]

        # Read before the batch's transaction: on SQLite that transaction holds the one write
        # lock, and a read on another connection (which begins IMMEDIATE) would wait on it.
        for run_id in {c.run_id for c in changes} | {b.run_id for b in row_batches}:
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
        if result.applied:
            self._written.added(result.rows)
            handled = Counter(result.rows) + Counter(r.change.table for r in result.refused)
            metrics.record_batch("sink", handled, time.monotonic() - started)
            metrics.record_output("sink", result.rows)
            self.status.applied(sum(len(r) for r in batch.values()), sum(handled.values()))
            logger.debug("applied changes: %s", result.rows)
        return result.applied

    async def _export_of(self, run_id: int) -> str | None:
        """The export a run came from, for the dead letters' provenance."""
        if run_id not in self._exports:
            run = await import_runs.load(self._engine, run_id)
            self._exports[run_id] = run.export_sha256 if run else None
        return self._exports[run_id]
