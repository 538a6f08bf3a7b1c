"""The `process` stage: source topics → document store → derivation → changes topic.

Documents are applied to the store in the same database transaction that moves this group's
positions, so a batch takes effect exactly once however often it is delivered. A run is
derived when the store holds every message the publisher sent for it (SPEC §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import OutOfOrderSequenceNumber, UnknownProducerId
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream import import_runs, metrics, status
from khala_stream.backpressure import Backpressure
from khala_stream.broker.loss import LossCheck, short_partitions
from khala_stream.config import Settings
from khala_stream.contract import (
    REPLACED_TABLES,
    DestinationTable,
    RowChange,
    RowUpsert,
    Topics,
    read_tables,
)
from khala_stream.contract.codec import encode_change, row_batch_headers, row_batches
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from khala_stream.db.engine import ensure_lookups
from khala_stream.db.importer_tables import DOCUMENTS, ROWS
from khala_stream.db.offsets import advance
from khala_stream.db.queries import stored_before
from khala_stream.db.statistics import Growth, analyze
from khala_stream.dead_letters import set_aside_records
from khala_stream.errors import TransientError, WorkosKeyError
from khala_stream.progress import StageStatus, consumer_lag
from khala_stream.runtime import (
    Batch,
    NeedsStage,
    Retries,
    StageClients,
    StageRunner,
    Stopping,
    Waiting,
    end_offsets,
)
from processors import scope, store, unchanged
from processors.autopilots import parse_allowed_hosts
from processors.derive import (
    COUNTER_KEYS,
    Derivation,
    Derived,
    RunContext,
    withheld_deletes,
)
from processors.identity import WorkosLookup
from processors.lookups import SqlUserIds, TargetView
from processors.screening import ScreenedDocuments, screen_documents
from processors.workos import WorkosClient, WorkosUser
from processors.workos_cache import SqlWorkosCache, resolve_with_cache

logger = logging.getLogger(__name__)


_CLAIM_GONE = (
    "another worker took it over after the database was out of reach for longer than the"
    " lease, or a newer import superseded the run"
)
_IN_FLIGHT = 6  # change messages sent before their acknowledgements are awaited
_SINK_BEHIND = 16  # change messages (of up to 512 KB) the sink may be behind the derivation
# Encoded changes (not row batches) become Python objects in the sink, several times their
# size, up to a poll's worth at once: smaller messages keep its peak the same at any size.
_CHANGES_CHUNK = 128 * 1024


class KafkaChangeOutput:
    """Sends changes to the changes topic in chunks, spread over its partitions.

    Order between chunks does not matter: a derivation emits each row at most once, and the
    next derivation starts only after the sink has applied everything before it.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        run_id: int,
        chunk_bytes: int = 512 * 1024,
        backpressure: Backpressure | None = None,
        status: StageStatus | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._run_id = run_id
        self._chunk_bytes = chunk_bytes
        self._backpressure = backpressure
        self._status = status
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._pending: list[asyncio.Future[Any]] = []
        self.ends: dict[int, int] = {}
        self.stop: asyncio.Event | None = None

    async def emit(self, changes: Sequence[RowChange]) -> None:
        metrics.record_output("process", Counter(c.table for c in changes))
        if self._status is not None:
            self._status.sent(len(changes))
        for change in changes:
            encoded = encode_change(change)
            if self._buffer and self._buffered + len(encoded) > _CHANGES_CHUNK:
                await self._send_changes()
            self._buffer.append(encoded)
            self._buffered += len(encoded) + 1

    async def emit_rows(
        self, table: DestinationTable, rows: Sequence[RowUpsert], *, new: bool = False
    ) -> None:
        metrics.record_output("process", {table: len(rows)})
        if self._status is not None:
            self._status.sent(len(rows))
        for batch in row_batches(self._run_id, table, rows, self._chunk_bytes, new=new):
            await self._send(batch.rows, row_batch_headers(batch))

    async def _send_changes(self) -> None:
        # A JSON array of the encoded changes, joined without encoding them again.
        value = b"[" + b",".join(self._buffer) + b"]"
        self._buffer, self._buffered = [], 0
        await self._send(value)

    async def _send(self, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopping  # a derivation is resumable: the next attempt starts over
        self._pending.append(await self._producer.send(self._topic, value, headers=headers))
        if len(self._pending) >= _IN_FLIGHT:
            await self._settle()
            if self._backpressure:
                await self._backpressure.wait(self._topic, self.ends)

    async def _settle(self) -> None:
        pending, self._pending = self._pending, []
        for metadata in await asyncio.gather(*pending):
            end = metadata.offset + 1
            self.ends[metadata.partition] = max(self.ends.get(metadata.partition, 0), end)

    async def pad(self, counts: dict[int, int]) -> None:
        """Send `counts[p]` empty change messages to each partition p (see
        `Processor._cover_lost_offsets`)."""
        for partition, count in counts.items():
            for _ in range(count):
                self._pending.append(
                    await self._producer.send(self._topic, b"[]", partition=partition)
                )
        await self._settle()

    async def drain(self) -> dict[int, int]:
        """Send what is buffered and wait for every acknowledgement; the end offset reached
        per partition."""
        if self._buffer:
            await self._send_changes()
        await self._settle()
        return self.ends


class _AlreadyApplied(Exception):
    """Another worker applied this batch first; the transaction is rolled back."""


class Processor:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        batch_records: int = 5000,
        db_deadline_s: float = 300.0,
        status: StageStatus | None = None,
    ) -> None:
        """`status`: the stage's counters and progress (a periodic INFO line by default)."""
        self._settings = settings
        self.status = status or StageStatus("process")
        self._engine = engine
        self._topics = Topics(settings.topic_prefix)
        self.name = "process"
        self.group = self._topics.processor_group
        self.topics = self._topics.sources
        self.batch_records = batch_records
        self._retries = Retries(db_deadline_s)
        self._until_idle = False
        self._stop = asyncio.Event()
        self._clients: StageClients | None = None
        self._lease_s = settings.derive_lease_s
        self._worker = uuid.uuid4().hex
        self.derived: list[int] = []
        self._loss_check = LossCheck()
        self._backpressure = Backpressure(
            engine, self._topics.sink_group, limit=_SINK_BEHIND, deadline_s=db_deadline_s
        )
        # The marking of unchanged documents looks the store up by key (producers/ledger.py).
        self._stored = Growth(engine, lambda _table: [DOCUMENTS.name])
        self._first_import: dict[tuple[int, str], bool] = {}
        self._lookups = False  # the store's lookup indexes are known to exist

    async def run(
        self, *, until_idle: bool = False, stop: asyncio.Event | None = None
    ) -> Waiting | None:
        """Run the stage (`khala_stream.runtime.StageRunner`); with `until_idle`, what is left
        for the sink, if anything, once nothing is left for this stage."""
        self._until_idle = until_idle
        self._stop = stop or asyncio.Event()
        runner: StageRunner[ScreenedDocuments] = StageRunner(
            self, self._settings.kafka, self._engine, self._retries, stop
        )
        try:
            return await runner.run(until_idle=until_idle)
        finally:
            await self.status.stop()

    # ------------------------------------------------------------------ the Stage plug-in

    def decode(self, batch: Batch) -> ScreenedDocuments:
        return screen_documents(batch, self._topics)

    async def apply(
        self, screened: ScreenedDocuments, batch: Batch
    ) -> dict[TopicPartition, int] | None:
        documents = screened.documents
        # What cannot be stored is set aside, acknowledged before the positions move past it.
        await set_aside_records(self._producer, self._topics.dead_letters, screened.letters)
        positions: dict[TopicPartition, int] = {}
        try:
            async with self._engine.begin() as conn:
                tables = {(d.run_id, d.table) for d in documents}
                fresh = all([await self._fresh(conn, run_id, table) for run_id, table in tables])
                await store.apply_documents(conn, documents, fresh=fresh)
                for tp, records in batch.items():
                    end = records[-1].offset + 1
                    if not await advance(
                        conn, self.group, tp.topic, tp.partition, records[0].offset, end
                    ):
                        raise _AlreadyApplied
                    positions[tp] = end
        except _AlreadyApplied:
            return None
        return positions

    async def applied(self, screened: ScreenedDocuments, batch: Batch, seconds: float) -> None:
        by_table = self._by_table(batch)
        self._stored.added(by_table)
        await self._retries.database(self._stored.refresh_if_due)
        metrics.record_batch("process", by_table, seconds)
        self.status.stored(sum(by_table.values()))
        logger.debug("stored documents: %s", dict(by_table))

    def attach(self, clients: StageClients) -> None:
        self._clients = clients
        self.status.start(functools.partial(consumer_lag, clients.consumer))

    async def between(self, *, until_idle: bool) -> bool:
        """Derive what is ready; True while a run is derived, or ready but claimed by another
        worker (a killed one's claim lapses after the lease)."""
        await self._derive_lost_again()
        return await self._derive_ready()

    async def waiting(self) -> Waiting | None:
        return await status.waiting_for_sink(self._engine, self._topics)

    # ------------------------------------------------------------------

    def _by_table(self, batch: Batch) -> Counter[str]:
        counts: Counter[str] = Counter()
        for tp, records in batch.items():
            counts[tp.topic.removeprefix(self._topics.prefix + ".")] += len(records)
        return counts

    async def _fresh(self, conn: AsyncConnection, run_id: int, table: str) -> bool:
        """No document of `table` from before run `run_id` in the store (asked once a run)."""
        if (run_id, table) not in self._first_import:
            before = await stored_before(conn, [table], run_id)
            self._first_import[(run_id, table)] = not before
        return self._first_import[(run_id, table)]

    @property
    def _producer(self) -> AIOKafkaProducer:
        assert self._clients is not None, "the runner has not started the clients"
        return self._clients.producer

    @property
    def _probe(self) -> AIOKafkaConsumer:
        assert self._clients is not None, "the runner has not started the clients"
        return self._clients.probe

    async def _derive_ready(self) -> bool:
        """Derive every run whose messages have all been applied to the store; True when one
        was derived, or is ready but claimed by another worker."""
        async with self._engine.connect() as conn:
            ready = []
            for run in await import_runs.published_runs(conn):
                applied = await store.applied_counts(conn, run.id)
                expected = run.manifest.published if run.manifest is not None else {}
                if all(applied.get(t, 0) >= n for t, n in expected.items()):
                    ready.append(run)
        busy = False
        for run in ready:
            busy = True
            if not await import_runs.claim(self._engine, run.id, self._worker, self._lease_s):
                continue
            try:
                await self._derive(run, self._producer)
            except (OutOfOrderSequenceNumber, UnknownProducerId) as exc:
                assert self._clients is not None
                await self._clients.renew_producer()
                raise TransientError(f"the broker refused the producer: {exc}") from exc
            except (NeedsStage, Stopping):
                # --until-idle, or a stop: the claim is given back, so that the next `process`
                # (or a running one) takes the run at once instead of after the lease.
                await self._retries.database(
                    functools.partial(import_runs.release, self._engine, run.id, self._worker)
                )
                raise
        return busy

    async def _derive_lost_again(self) -> None:
        """Derive the latest run again if the broker lost changes it had acknowledged.

        The import waits until the sink has read every change up to the run's acknowledged
        ends; a broker that loses the tail of the changes topic (noida-db does on a stop that
        races a write; a new broker in place of the old one) would make that wait endless. Only
        the latest run can be waiting: a derivation starts after the sink applied everything
        before it. Checked every few seconds, only while that run waits for the sink.
        """
        if not self._loss_check.due():
            return
        run = await import_runs.latest(self._engine)
        topic = self._topics.changes
        if run is None or run.status != "derived":
            return
        if await import_runs.applied_by_sink(self._engine, run, self._topics.sink_group, topic):
            return
        ends = await end_offsets(self._probe, topic)
        lost = short_partitions(ends, run.changes_end)
        if lost and await import_runs.derive_again(self._engine, run.id):
            logger.warning(
                "run %d: the broker lost changes it had acknowledged (partition: end now,"
                " acknowledged end: %s); deriving the run again",
                run.id,
                lost,
            )

    async def _cover_lost_offsets(self, run: import_runs.ImportRun, out: KafkaChangeOutput) -> None:
        """Lengthen a changes topic that is shorter than what was read from it, before sending.

        When the broker lost records (or a new broker took the old one's place), the sink holds
        positions beyond the end of the log: stored ones, and in memory up to the acknowledged
        end of the last derivation. New changes written below those positions would be skipped,
        so the log is first padded with empty change messages up to them.
        """
        topic = self._topics.changes
        floor = await import_runs.stored_positions(self._engine, self._topics.sink_group, topic)
        async with self._engine.connect() as conn:
            before = await import_runs.latest_derived_before(conn, run.id)
        for acknowledged in (run.changes_end, before.changes_end if before else {}):
            for p, end in acknowledged.items():
                floor[p] = max(floor.get(p, 0), end)
        ends = await end_offsets(self._probe, topic)
        short = {p: floor[p] - end for p, end in ends.items() if floor.get(p, 0) > end}
        if short:
            logger.warning(
                "run %d: the changes topic is shorter than what was read from it (the broker"
                " lost records); padding partitions %s with empty messages",
                run.id,
                sorted(short),
            )
            await out.pad(short)

    async def _derive(self, run: import_runs.ImportRun, producer: AIOKafkaProducer) -> None:
        logger.info("deriving run %d", run.id)
        out = KafkaChangeOutput(
            producer,
            self._topics.changes,
            run.id,
            backpressure=self._backpressure,
            status=self.status,
        )
        out.stop = self._stop
        # Runs are derived once published, with their manifest (an empty one stands in).
        manifest = run.manifest or PublishManifest(run_id=run.id, export_sha256=run.export_sha256)
        context = RunContext(
            run_id=run.id,
            snapshot_ms=run.snapshot_ms or 0,
            allowed_hosts=parse_allowed_hosts(self._settings.l402_allowlist_hosts),
            options=run.options,
            withheld_deletes=withheld_deletes(manifest, read_tables(run.options.skip_blueprints)),
            generations=manifest.generations(),
        )
        fingerprint = unchanged.fingerprint(context)
        work = asyncio.ensure_future(self._derive_claimed(run, context, fingerprint, out))
        beat = asyncio.ensure_future(self._heartbeat(run.id))
        try:
            await asyncio.wait({work, beat}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            beat.cancel()
            work.cancel()  # no-op when it is done
            await asyncio.gather(work, beat, return_exceptions=True)
        if work.cancelled():  # the heartbeat ended first
            if (error := beat.exception()) is not None:
                raise error  # the database stayed out of reach past the deadline
            logger.warning("run %d: the claim on it is gone (%s); stopped", run.id, _CLAIM_GONE)
            return
        result, reused, ends = work.result()
        summary = DerivationSummary(
            counters=dict(result.counters),
            written=result.written,
            documents={t: asdict(c) for t, c in result.documents.items()},
            fingerprint=fingerprint,
            skipped=reused,
            scoped_threads=result.scoped_threads,
        )
        if not await import_runs.mark_derived(
            self._engine, run.id, self._worker, summary=summary, changes_end=ends
        ):
            logger.warning("run %d: the claim on it is gone (%s)", run.id, _CLAIM_GONE)
            return
        self.derived.append(run.id)
        logger.info("run %d derived: %d changes", run.id, sum(result.written.values()))

    async def _derive_claimed(
        self,
        run: import_runs.ImportRun,
        context: RunContext,
        fingerprint: dict[str, Any],
        out: KafkaChangeOutput,
    ) -> tuple[Derived, bool, dict[int, int]]:
        """The derivation proper, while the claim is held: what it derived, whether it was
        skipped as unchanged, and the end offsets its changes reached."""
        # The derivation reads the database: let every change sent before it land first
        # (after a crash, the changes of the interrupted attempt).
        await self._wait_for_sink(await end_offsets(self._probe, self._topics.changes), run.id)
        await self._cover_lost_offsets(run, out)
        tables = read_tables(run.options.skip_blueprints)
        if not self._lookups:
            self._lookups = await ensure_lookups(self._engine, tables, run.id)
        async with self._engine.connect() as conn:
            documents = await store.table_changes(
                conn,
                run.id,
                tables,
                context.generations,
                await _before(conn, run.id),
            )
            reused = await unchanged.reusable_counters(conn, run, fingerprint, documents)
            threads = await scope.plan(conn, run, context, fingerprint) if reused is None else None
        if reused is not None:
            logger.info("run %d: the last derived run's documents; nothing to derive", run.id)
            result = Derived(counters=dict.fromkeys(COUNTER_KEYS, 0) | reused)
            result.documents = documents
        else:
            if threads is None:
                # A full derivation's reads are planned over the whole store; a scoped one's go
                # by index, and an ANALYZE of a 1M-document store would cost it seconds.
                await analyze(self._engine, [DOCUMENTS.name, ROWS.name])
            result = await self._derive_all(run, context, out, documents, threads)
        return result, reused is not None, await out.drain()

    async def _derive_all(
        self,
        run: import_runs.ImportRun,
        context: RunContext,
        out: KafkaChangeOutput,
        statistics: dict[str, store.TableChanges],
        threads: frozenset[str] | None,
    ) -> Derived:
        """`threads`: the scope of a scoped derivation (`processors/scope.py`), or None."""
        flags = run.options
        async with contextlib.AsyncExitStack() as stack:
            # The WorkOS key is checked before the truncation: a missing or refused key must
            # not leave the chat tables empty.
            workos = (
                await self._workos_lookup(stack, check=flags.replace)
                if flags.resolve_workos_users
                else None
            )
            if flags.replace:
                await self._truncate_first(run, out)
            derivation = Derivation(
                context=context,
                documents=self._engine,
                view=TargetView(self._engine, replace=flags.replace),
                user_ids=SqlUserIds(self._engine),
                workos=workos,
                out=out,
                statistics=statistics,
                progress=self._derive_progress,
                scope=threads,
            )
            result = await derivation.run()
        return result

    def _derive_progress(self, phase: str, done: int, total: int | None, finished: bool) -> None:
        self.status.phase(f"derive {phase}", done, total, finished)

    async def _truncate_first(self, run: import_runs.ImportRun, out: KafkaChangeOutput) -> None:
        """--replace: the sink empties the six chat tables before any row of this run lands.

        Once per run: an attempt that finds them sent by an earlier one (killed, or stopped by
        `--until-idle` to let the sink apply them) knows that the sink applied them, and every
        row written since, before this attempt began (`_derive_claimed`); the derivation reads
        those tables as empty and sends every row of theirs again, so nothing is left over.
        Truncating again would make `process --until-idle` and `sink --until-idle` in turn
        truncate for ever.
        """
        if await import_runs.truncated(self._engine, run):
            return
        truncates = [
            RowChange(run_id=run.id, table=t, op="truncate", key="") for t in REPLACED_TABLES
        ]
        await out.emit(truncates)
        ends = dict(await out.drain())
        await self._retries.database(
            lambda: import_runs.note_truncated(self._engine, run.id, self._worker)
        )
        await self._wait_for_sink(ends, run.id)

    async def _wait_for_sink(self, ends: dict[int, int], run_id: int) -> None:
        """Until the sink's stored positions reach `ends` on every partition.

        With `--until-idle` it does not wait: NeedsStage says how many change messages the
        sink has left to apply (no sink may be running).
        """
        group, topic = self._topics.sink_group, self._topics.changes
        polls = 0
        while not import_runs.reached(
            positions := await import_runs.stored_positions(self._engine, group, topic), ends
        ):
            if self._until_idle:
                left = sum(max(0, e - positions.get(p, 0)) for p, e in ends.items())
                reason = f"run {run_id} waits for the sink to apply {left} change message(s)"
                raise NeedsStage(Waiting("sink", reason))
            if polls % 50 == 0:
                logger.info("run %d waits for the sink to apply earlier changes", run_id)
            polls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)
            if self._stop.is_set():
                raise Stopping

    async def _workos_lookup(
        self, stack: contextlib.AsyncExitStack, *, check: bool
    ) -> WorkosLookup:
        """The run's WorkOS look-ups; `check`: ask WorkOS whether it takes the key first (one
        request; a refused key is a WorkosKeyError, exit 2)."""
        key = self._settings.workos_api_key
        if key is None:
            raise WorkosKeyError("--resolve-workos-users needs WORKOS_API_KEY in the environment")
        client = await stack.enter_async_context(
            WorkosClient(api_key=key.reveal(), base_url=self._settings.workos_base_url)
        )
        if check:
            await client.check_key()
        cache = SqlWorkosCache(self._engine)

        async def lookup(ids: Sequence[str]) -> dict[str, WorkosUser | None]:
            answers, _ = await resolve_with_cache(client, cache, ids)
            return answers

        return lookup

    async def _heartbeat(self, run_id: int) -> None:
        """Renews the claim on a run until cancelled; returns when the claim is gone
        (`_CLAIM_GONE`)."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            renewed = await self._retries.database(
                lambda: import_runs.heartbeat(self._engine, run_id, self._worker)
            )
            if not renewed:
                return


_STATISTICS: Final = frozenset(f.name for f in fields(store.TableChanges))


async def _before(conn: AsyncConnection, run_id: int) -> store.Before | None:
    """The run just before `run_id` when it is derived, for `store.table_changes`."""
    previous = await import_runs.latest_derived_before(conn, run_id)
    if (
        previous is None
        or previous.id != run_id - 1
        or previous.manifest is None
        or previous.summary is None
    ):
        return None
    manifest = previous.manifest
    return store.Before(
        generations={t: manifest.generation(t) for t in manifest.tables},
        documents={
            t: store.TableChanges(**c)
            for t, c in previous.summary.documents.items()
            # As recorded by this version, and still the store's: a run that propagated
            # deletes may have taken the vanished documents it counted out of the store.
            if set(c) == _STATISTICS and not (previous.options.propagate_deletes and c["deleted"])
        },
    )
