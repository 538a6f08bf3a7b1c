"""The `publish` stage: every document of an export to its source topic, with provenance.

Bad lines and documents without a key go to the dead-letter topic with their raw bytes; a
message without its key is also published under its line and content (`keyless_key`): it
still seeds its thread's title.
Incremental publishing sends only new and changed documents; an unchanged one (same content
hash in the ledger) is marked as part of this export in the ledger instead (SPEC §5). A table
whose entry is byte for byte the one of the run just before is not read at all: the run carries
that run's documents of it over (`PublishManifest.carried`), and its counts with them. A
`follow` step may instead be published as an amendment of the run before
(`publish_amendment`, `producers/amendment.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs, metrics
from khala_stream.backpressure import Backpressure
from khala_stream.contract import SOURCE_TABLES, Topics, codec, read_tables
from khala_stream.contract.dead_letters import DeadLetter, ReasonCode
from khala_stream.contract.documents import (
    Provenance,
    document_hash,
    document_headers,
    document_key,
    keyless_key,
)
from khala_stream.contract.runs import PublishManifest
from khala_stream.contract.tables import DOCUMENT_KEYS
from khala_stream.db.port import Database
from khala_stream.db.queries import stored_before
from khala_stream.dead_letters import publish_dead_letters
from khala_stream.progress import ProgressCallback
from producers.amendment import Amendment
from producers.batches import PartitionedBatches
from producers.export_reader import (
    HOLDS_NUL,
    TOO_DEEP,
    ExportSource,
    RejectedLine,
    SourceDocument,
)
from producers.later_state import LaterState
from producers.ledger import Marking, mark_unchanged

logger = logging.getLogger(__name__)
_BATCH = 2000
_BATCH_BYTES = 1 << 20  # of raw lines: parsed, a batch takes several times that (3 are alive)
_YIELD_EVERY = 100
_AHEAD = 2  # batches marked and sent while the next is read
_MAX_HELD = 20_000  # lines held back at most (see `_send`)
_NOTHING = hashlib.sha256(b"").hexdigest()  # a tombstone's content hash


@dataclass(slots=True)
class PublishReport:
    """What one export's publishing did, per source table."""

    run_id: int
    sha256: str
    snapshot_ms: int
    source: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    missing_key: Counter[str] = field(default_factory=Counter)
    published: Counter[str] = field(default_factory=Counter)
    unchanged: Counter[str] = field(default_factory=Counter)
    rejected_lines: list[tuple[str, int, str]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    ignored_tables: list[str] = field(default_factory=list)
    # Per table, the sha256 of the document keys in file order: an export of the same
    # documents in another order may derive other rows (ties go to the later line).
    order: dict[str, hashlib._Hash] = field(default_factory=dict)
    entries: dict[str, str] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)
    carried_order: dict[str, str] = field(default_factory=dict)
    """The order digests of carried tables, as their run recorded them."""
    patched: dict[str, int] = field(default_factory=dict)

    def orders(self) -> dict[str, str]:
        return {t: d.hexdigest() for t, d in self.order.items()} | self.carried_order

    def manifest(self) -> PublishManifest:
        return PublishManifest(
            run_id=self.run_id,
            export_sha256=self.sha256,
            published=dict(self.published),
            source=dict(self.source),
            rejected=dict(self.rejected),
            missing_key=dict(self.missing_key),
            unchanged=dict(self.unchanged),
            rejected_lines=list(self.rejected_lines),
            tables=self.tables,
            ignored_tables=self.ignored_tables,
            order=self.orders(),
            entries=dict(self.entries),
            carried=dict(self.carried),
            patched=dict(self.patched),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "published": dict(self.published),
            "source": dict(self.source),
            "rejected": dict(self.rejected),
            "missing_key": dict(self.missing_key),
            "unchanged": dict(self.unchanged),
            "rejected_lines": [list(r) for r in self.rejected_lines],
            "tables": self.tables,
            "ignored_tables": self.ignored_tables,
            "order": self.orders(),
            "carried": dict(self.carried),
            "patched": dict(self.patched),
        }


def reason_code(rejected: RejectedLine) -> ReasonCode:
    if rejected.reason.startswith("invalid UTF-8"):
        return "invalid_utf8"
    if rejected.reason.startswith("not a JSON object"):
        return "not_object"
    if rejected.reason.startswith("line too long"):
        return "too_long"
    if rejected.reason == TOO_DEEP:
        return "too_deep"
    if rejected.reason == HOLDS_NUL:
        return "holds_nul"
    return "invalid_json"


class InWriting(Protocol):
    """An export still being written table by table (`follow` publishing a snapshot as it
    walks it): its tables go out in the order they are written (each is stored on its own,
    so no other order is needed)."""

    async def next_written(self, tables: Sequence[str]) -> str:
        """The one of `tables` to read next: one the export will never hold at once (nothing
        to wait for), else the next one written, once it is."""
        ...


class Publisher:
    """Publishes one export as one import run."""

    def __init__(
        self,
        *,
        producer: AIOKafkaProducer,
        db: Database,
        topics: Topics,
        incremental: bool,
        skip_blueprints: bool,
        carry_unchanged: bool,
        progress: ProgressCallback | None = None,
        max_reported_rejections: int = 1000,
        backpressure: Backpressure | None = None,
    ) -> None:
        """Every database call goes through `db` (waits out outages); `backpressure` holds
        sending back while the processor falls behind; `carry_unchanged` lets an incremental
        run carry over the tables that did not change since the run before (module doc)."""
        self._producer = producer
        self._db = db
        self._topics = topics
        self._incremental = incremental
        self._carry_unchanged = carry_unchanged and incremental
        self._skip_blueprints = skip_blueprints
        self._progress = progress
        self._max_reported = max_reported_rejections
        self._again = False
        self._backpressure = backpressure
        # Per table, lines held back because a later line of their key is most likely coming
        # (the store holds that key from a later line); see `_send`.
        self._held: dict[str, tuple[str, SourceDocument]] = {}

    async def publish(
        self,
        export: ExportSource,
        run_id: int,
        *,
        applied: Mapping[str, int] | None = None,
        later: LaterState | None = None,
        writing: InWriting | None = None,
    ) -> PublishReport:
        """Publish `export` as run `run_id`.

        With `applied` (the documents of this run the store already holds, by table), the run
        is published again because the broker lost documents it had acknowledged: only what
        the store lacks is sent (the rest is "unchanged"), no dead letter is sent twice, and
        the run announces `applied` plus what was sent, so the derivation waits for those.
        With `later`, the export is older than a followed deployment's state: the tables
        `follow` publishes are carried over as the run before holds them, whatever the export
        has of them (`producers/later_state.py`). With `writing`, the export is still being
        written: its tables go out in the order they are written, each once written.
        """
        self._again = applied is not None
        snapshot_ms = (export.snapshot_ms or 0) if later is None else later.snapshot_ms
        report = PublishReport(run_id=run_id, sha256=export.sha256(), snapshot_ms=snapshot_ms)
        kept = later.tables if later is not None else ()
        report.tables = sorted({t for t in export.tables if t in SOURCE_TABLES} | set(kept))
        report.ignored_tables = sorted(t for t in export.tables if t not in SOURCE_TABLES)
        # Published again after a loss, a table may be half marked: it is marked in full.
        base = None
        if self._carry_unchanged and not self._again:
            base = await self._db.run(_carry_base, run_id)
        tables: list[str] = list(read_tables(self._skip_blueprints))  # reference §6.4
        while tables:
            table = tables[0] if writing is None else await writing.next_written(tables)
            tables.remove(table)
            if later is not None and table in kept:
                entry = later.base.entries.get(table, "")
                if entry:
                    report.entries[table] = entry
                _carry(table, entry, later.base, report, self._max_reported)
                continue
            digest = export.entry_sha256(table)
            if digest is not None:
                report.entries[table] = digest
            if base is not None and digest is not None and base.entries.get(table) == digest:
                _carry(table, export.tables[table], base, report, self._max_reported)
                if self._progress:
                    self._progress(table, 0)
                    self._progress(table, base.source.get(table, 0), done=True)
                continue
            await self._publish_table(export, table, report)
        report.published.update(applied or {})  # Counter.update adds
        await self._announce(report)
        return report

    async def publish_amendment(
        self,
        base: PublishManifest,
        amendments: Mapping[str, Amendment],
        run_id: int,
        *,
        sha256: str,
        snapshot_ms: int,
    ) -> PublishReport:
        """Publish run `run_id` as run `base` amended in place (`producers/amendment.py`):
        the tables in `amendments` send their winners and tombstones under the generation
        `base` stores them in, the others are carried over from `base`. `base` listed no
        rejected line in an amended table (its count could not be kept true)."""
        report = PublishReport(run_id=run_id, sha256=sha256, snapshot_ms=snapshot_ms)
        report.tables, report.ignored_tables = list(base.tables), list(base.ignored_tables)
        for table in read_tables(self._skip_blueprints):
            if table not in base.tables:
                continue  # as the export it amends: missing
            entry = base.entries.get(table, "")
            amendment = amendments.get(table)
            if amendment is None:
                if entry:
                    report.entries[table] = entry
                _carry(table, entry, base, report, self._max_reported)
                continue
            generation = base.generation(table)
            report.patched[table] = generation
            report.source[table] = base.source.get(table, 0) + amendment.present_change
            if base.missing_key.get(table):
                report.missing_key[table] = base.missing_key[table]
            # Another order than any export's: no later run takes it for the same documents.
            order = hashlib.sha256(f"amends {base.run_id} as {run_id}: ".encode())
            report.order[table] = order
            outgoing = []
            for w in amendment.documents:
                doc = orjson.loads(w.raw)
                item = SourceDocument(table=table, entry=entry, line=w.line, raw=w.raw, doc=doc)
                outgoing.append((w.key, document_hash(doc), item))
            await self._emit(table, outgoing, report, generation=generation, gone=amendment.gone)
            report.unchanged[table] = max(0, report.source[table] - len(outgoing))
        await self._announce(report)
        return report

    async def _announce(self, report: PublishReport) -> None:
        """The run is published: its manifest to the manifests topic, then to its run row."""
        manifest = report.manifest()
        await self._producer.send_and_wait(
            self._topics.manifests,
            codec.encode_manifest(manifest),
            key=str(report.run_id).encode(),
        )
        await self._db.run(
            import_runs.mark_published,
            report.run_id,
            manifest=manifest,
            snapshot_ms=report.snapshot_ms,
        )

    async def _publish_table(self, export: ExportSource, table: str, report: PublishReport) -> None:
        batch: list[SourceDocument] = []
        letters: list[DeadLetter] = []
        batch_bytes = 0
        read = 0
        # Batches are marked (a round trip and a commit each) while the next ones are read and
        # parsed, up to `_AHEAD` at once; they still go out to the broker in file order.
        pipeline: list[asyncio.Task[None]] = []
        # A table the ledger holds nothing of has nothing unchanged: its first import sends
        # every document without asking (a re-publish of this run still marks what it sent).
        marking = self._incremental and (
            self._again or await self._db.run(_stored_before, table, report.run_id)
        )
        if self._progress:
            self._progress(table, 0)  # the table's clock starts
        try:
            for item in export.iter_table(table):
                read += 1
                if read % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if isinstance(item, RejectedLine):
                    report.rejected[table] += 1
                    if len(report.rejected_lines) < self._max_reported:
                        report.rejected_lines.append((item.entry, item.line, item.reason))
                    letters.append(self._letter(item, reason_code(item), item.reason, report))
                else:
                    report.source[table] += 1
                    batch.append(item)
                    batch_bytes += len(item.raw)
                if len(batch) >= _BATCH or batch_bytes >= _BATCH_BYTES or len(letters) >= _BATCH:
                    await self._queue(pipeline, table, batch, letters, report, marking)
                    batch, letters, batch_bytes = [], [], 0
                    if self._progress:
                        self._progress(table, read)
            await self._queue(pipeline, table, batch, letters, report, marking)
            for task in pipeline:
                await task
            # Held lines whose key did not come again are the last of their key: they count.
            held = [(key, digest, item) for key, (digest, item) in self._held.items()]
            self._held.clear()
            await self._emit(table, held, report)
        finally:
            for task in pipeline:
                task.cancel()  # after a failure: the batches behind it
        if self._progress:
            self._progress(table, read, done=True)
        logger.debug(
            "published %s: %d lines, %d sent, %d unchanged, %d set aside",
            table,
            read,
            report.published[table],
            report.unchanged[table],
            report.rejected[table] + report.missing_key[table],
        )

    def _letter(
        self,
        item: RejectedLine | SourceDocument,
        code: ReasonCode,
        reason: str,
        report: PublishReport,
    ) -> DeadLetter:
        return DeadLetter(
            stage="publish",
            reason_code=code,
            reason=reason,
            raw=item.raw,
            table=item.table,
            entry=item.entry,
            line=item.line,
            export_sha256=report.sha256,
            run_id=report.run_id,
        )

    async def _queue(
        self,
        pipeline: list[asyncio.Task[None]],
        table: str,
        batch: list[SourceDocument],
        letters: list[DeadLetter],
        report: PublishReport,
        marking: bool,
    ) -> None:
        """Start marking and sending a batch after those in `pipeline`; wait for the oldest
        while more than `_AHEAD` are under way."""
        order = report.order.setdefault(table, hashlib.sha256())
        keyed: list[tuple[str, str, SourceDocument]] = []
        for item in batch:
            digest = document_hash(item.doc)
            key = document_key(table, item.doc, digest)
            if key is None:
                report.missing_key[table] += 1
                field_name = DOCUMENT_KEYS[table]  # type: ignore[index]
                reason = f"no string {field_name!r}: the document cannot be identified"
                letters.append(self._letter(item, "missing_key", reason, report))
                key = keyless_key(table, item.line, digest)  # still read for the titles
            if key is not None:
                keyed.append((key, digest, item))
                order.update(orjson.dumps(key))  # JSON strings: concatenated, still unambiguous
        after = pipeline[-1] if pipeline else None
        pipeline.append(
            asyncio.create_task(
                self._send(table, keyed, len(batch), letters, report, marking, after)
            )
        )
        if len(pipeline) > _AHEAD:
            await pipeline.pop(0)

    async def _send(
        self,
        table: str,
        keyed: list[tuple[str, str, SourceDocument]],
        read: int,
        letters: list[DeadLetter],
        report: PublishReport,
        marking_on: bool,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """Mark what is unchanged of the (key, content hash, document)s of `read` documents,
        then, once the batch `after` is sent, send the rest."""
        started = time.monotonic()
        marking = Marking()
        if marking_on and keyed:
            documents = [(k, d, i.line) for k, d, i in keyed]
            marking = await self._db.run(mark_unchanged, table, report.run_id, documents)
        if after is not None:
            await after
        # From here on batches take turns in file order. Only the last line of a key counts
        # (SPEC §8.2): a line whose key comes again is dropped, whether that later line is in
        # this batch or further on. A line the ledger knows from a later line is held until
        # its key comes again or the table ends, so an unchanged repeated key costs nothing.
        last_line = {key: item.line for key, _, item in keyed}
        outgoing: list[tuple[str, str, SourceDocument]] = []
        for key, digest, item in keyed:
            self._held.pop(key, None)
            if last_line[key] != item.line:
                continue
            if (key, item.line) in marking.unchanged:
                report.unchanged[table] += 1
            elif key in marking.later:
                self._held[key] = (digest, item)
            else:
                outgoing.append((key, digest, item))
        while len(self._held) > _MAX_HELD:  # bounded memory: the oldest goes out now
            oldest = next(iter(self._held))
            outgoing.append((oldest, *self._held.pop(oldest)))
        topic, ends = await self._emit(table, outgoing, report)
        if letters and not self._again:
            await publish_dead_letters(self._producer, self._topics.dead_letters, letters)
            for code, n in Counter(letter.reason_code for letter in letters).items():
                metrics.dead_letters("publish", code, n)
        if self._backpressure and ends:
            await self._backpressure.wait(topic, ends)
        elapsed = time.monotonic() - started
        metrics.record_batch("publish", {table: read + len(letters)}, elapsed)

    async def _emit(
        self,
        table: str,
        outgoing: list[tuple[str, str, SourceDocument]],
        report: PublishReport,
        *,
        generation: int | None = None,
        gone: Sequence[str] = (),
    ) -> tuple[str, dict[int, int]]:
        """Send (key, content hash, document)s to the table's topic, and a tombstone for each
        key `gone` (an amendment of `generation`); the end offsets reached."""
        topic = self._topics.source(table)
        batches = await PartitionedBatches.for_topic(self._producer, topic)
        for key, digest, item in outgoing:
            provenance = Provenance(
                export_sha256=report.sha256,
                run_id=report.run_id,
                table=table,
                line=item.line,
                doc_id=item.doc.get("_id") if isinstance(item.doc.get("_id"), str) else None,
                content_hash=digest,
                generation=generation,
            )
            await batches.add(key.encode(), item.raw, document_headers(provenance))
        for key in gone:
            tombstone = Provenance(
                export_sha256=report.sha256,
                run_id=report.run_id,
                table=table,
                line=0,
                doc_id=None,
                content_hash=_NOTHING,
                generation=generation,
                deleted=True,
            )
            await batches.add(key.encode(), b"", document_headers(tombstone))
        if outgoing or gone:
            report.published[table] += len(outgoing) + len(gone)
        ends = await batches.flush()
        metrics.record_output("publish", {table: len(outgoing) + len(gone)})
        return topic, ends


def _carry(
    table: str, entry: str, base: PublishManifest, report: PublishReport, max_reported: int
) -> None:
    """Carry `table` over from run `base` (same entry bytes): the same lines, so the same
    documents, rejections and order; none is sent again, dead letters included (they are in
    the dead-letter topic from the run that read them)."""
    report.carried[table] = base.generation(table)
    for mine, theirs in (
        (report.source, base.source),
        (report.rejected, base.rejected),
        (report.missing_key, base.missing_key),
    ):
        if theirs.get(table):
            mine[table] = theirs[table]
    report.unchanged[table] = base.published.get(table, 0) + base.unchanged.get(table, 0)
    if table in base.order:
        report.carried_order[table] = base.order[table]
    room = max_reported - len(report.rejected_lines)
    report.rejected_lines += [r for r in base.rejected_lines if r[0] == entry][: max(room, 0)]


async def _carry_base(engine: AsyncEngine, run_id: int) -> PublishManifest | None:
    """The manifest of the run just before `run_id` when it can be carried over from
    (`import_runs.derived_just_before`, not a --replace), else None."""
    async with engine.connect() as conn:
        previous = await import_runs.derived_just_before(conn, run_id)
    if previous is None or previous.options.replace:
        return None
    return previous.manifest


async def _stored_before(engine: AsyncEngine, table: str, run_id: int) -> bool:
    async with engine.connect() as conn:
        return await stored_before(conn, [table], run_id)
