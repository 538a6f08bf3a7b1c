"""`dlq list` and `dlq replay`: what was set aside, and retrying it once the cause is fixed.

Rows the database refused are retried through the sink; a replayed letter is remembered in
`khala_import_replayed` and no longer listed. Bad source lines cannot be retried from their
bytes: they need a corrected export. Neither can records a stage set aside (undecodable, or
changes the sink must not apply): no run will ever send them as they are, so they are left
listed, with the topic, partition and offset they were read at, for someone to look into.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.config import KafkaSettings
from khala_stream.contract import RowChange
from khala_stream.contract.codec import CodecError, decode_change
from khala_stream.contract.dead_letters import DeadLetter
from khala_stream.db.importer_tables import REPLAYED, RUNS
from khala_stream.dead_letters import StoredDeadLetter, read_dead_letters
from sinks.change_rules import forbidden
from sinks.sql_sink import SqlSink


@dataclass(slots=True)
class ReplayResult:
    retried: int = 0
    applied: int = 0
    still_refused: list[dict[str, str]] = field(default_factory=list)
    not_retryable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "retried": self.retried,
            "applied": self.applied,
            "still_refused": self.still_refused,
            "not_retryable": self.not_retryable,
        }


async def _replayed(engine: AsyncEngine, topic: str) -> set[tuple[int, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(REPLAYED.c.partition, REPLAYED.c.offset).where(REPLAYED.c.topic == topic)
        )
        return {(int(p), int(o)) for p, o in rows.all()}


async def pending_letters(
    kafka: KafkaSettings, engine: AsyncEngine | None, topic: str
) -> list[StoredDeadLetter]:
    """The dead letters not replayed yet (all of them when there is no database to ask), each
    once: the first copy stands for later copies of the same letter (see `_pending_copies`)."""
    return [copies[0] for copies in await _pending_copies(kafka, engine, topic)]


async def _pending_copies(
    kafka: KafkaSettings, engine: AsyncEngine | None, topic: str
) -> list[list[StoredDeadLetter]]:
    """The letters not replayed yet, grouped by equal content. A sink batch that rolls back
    after publishing its letters (another worker applied it first, or the database failed
    before the commit) publishes them again when it is applied: the same letter twice."""
    letters = await read_dead_letters(kafka, topic)
    done = await _replayed(engine, topic) if engine is not None else set()
    copies: dict[DeadLetter, list[StoredDeadLetter]] = {}
    for s in letters:
        if (s.partition, s.offset) not in done:
            copies.setdefault(s.letter, []).append(s)
    return list(copies.values())


async def run_sources(engine: AsyncEngine, letters: list[StoredDeadLetter]) -> dict[int, str]:
    """The export file each letter's run imported, by run id (runs the database forgot are
    left out)."""
    ids = sorted({s.letter.run_id for s in letters if s.letter.run_id is not None})
    if not ids:
        return {}
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(RUNS.c.id, RUNS.c.source).where(RUNS.c.id.in_(ids)))
        return {int(i): str(source) for i, source in rows.all()}


def provenance(letter: dict[str, Any]) -> str:
    """Where a letter of `summarise` came from, in words: its export and run."""
    sha = letter.get("export_sha256")
    run = letter.get("run_id")
    source = letter.get("export_source")
    export = f"export {source} (sha256 {sha[:12]})" if source and sha else None
    export = export or (f"export sha256 {sha[:12]}" if sha else "export unknown")
    return f"{export}, run {run}" if run is not None else f"{export}, run unknown"


def summarise(
    letters: list[StoredDeadLetter], sources: dict[int, str] | None = None
) -> dict[str, Any]:
    """`dlq list`'s facts; `sources` (`run_sources`) names each letter's export file."""
    sources = sources or {}
    return {
        "total": len(letters),
        "by_reason": dict(Counter(s.letter.reason_code for s in letters)),
        "letters": [
            {
                "partition": s.partition,
                "offset": s.offset,
                "stage": s.letter.stage,
                "reason_code": s.letter.reason_code,
                "reason": s.letter.reason,
                "location": s.letter.location,
                "table": s.letter.table,
                "doc_id": s.letter.doc_id,
                "run_id": s.letter.run_id,
                "export_sha256": s.letter.export_sha256,
                "export_source": sources.get(s.letter.run_id)
                if s.letter.run_id is not None
                else None,
                "source_topic": s.letter.source_topic,
                "source_partition": s.letter.source_partition,
                "source_offset": s.letter.source_offset,
            }
            for s in letters
        ],
    }


def _retryable(letter: DeadLetter) -> RowChange | None:
    """The change a refused row's letter holds, or None when it is not one to retry. The
    dead-letter topic is no more trusted than the changes topic: a letter's change passes the
    sink's rules before it is applied."""
    if letter.reason_code != "db_refused":
        return None
    try:
        change = decode_change(letter.raw)
    except CodecError:
        return None
    return change if forbidden(change) is None else None


async def replay(kafka: KafkaSettings, engine: AsyncEngine, topic: str) -> ReplayResult:
    pending = await _pending_copies(kafka, engine, topic)
    rows = [(c, change) for c in pending if (change := _retryable(c[0].letter)) is not None]
    result = ReplayResult(retried=len(rows), not_retryable=len(pending) - len(rows))
    if not rows:
        return result
    outcome = await SqlSink(engine).apply([change for _, change in rows])
    refused = {(r.change.table, r.change.key): r.reason for r in outcome.refused}
    applied = [copies for copies, c in rows if (c.table, c.key) not in refused]
    result.applied = len(applied)
    done = [s for copies in applied for s in copies]  # every copy is replayed with the first
    result.still_refused = [
        {"table": table, "key": key, "reason": reason} for (table, key), reason in refused.items()
    ]
    if done:
        now = datetime.now(tz=UTC).replace(tzinfo=None, microsecond=0)
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(REPLAYED),
                [
                    {
                        "topic": topic,
                        "partition": s.partition,
                        "offset": s.offset,
                        "replayed_at": now,
                    }
                    for s in done
                ],
            )
    return result
