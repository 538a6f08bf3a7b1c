"""Incremental publishing: the ledger of documents already imported, by content hash.

A document whose content is unchanged is not published again: the publisher marks its ledger
row as part of the new export instead (SPEC §5), so the processors derive from it as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.importer_tables import DOCUMENTS
from khala_stream.db.queries import one_of


async def stored_hashes(engine: AsyncEngine, table: str, keys: Sequence[str]) -> dict[str, str]:
    """Content hash per document key, for the keys the ledger knows."""
    if not keys:
        return {}
    c = DOCUMENTS.c
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(c.doc_key, c.content_hash).where(
                c.source_table == table, one_of(c.doc_key, keys, engine.dialect.name)
            )
        )
        return dict(result.tuples().all())


# Rows are locked in key order before they are updated, the order the processors' store upsert
# takes too (`processors/store.py`): two writers of the store that lock in one order cannot
# deadlock. The answer names, for each document of the batch the store holds, whether it was
# marked, and the line its stored version came from.
_MARK_PG: Final = sa.text(
    """
    WITH v AS (
        SELECT * FROM unnest(CAST(:keys AS text[]), CAST(:hashes AS text[]),
                             CAST(:lines AS integer[])) AS v(k, h, n)
    ), locked AS (
        SELECT d.doc_key, d.line, v.h, v.n, d.content_hash, d.export_seq
        FROM khala_import_documents AS d JOIN v ON d.doc_key = v.k
        WHERE d.source_table = :table
        ORDER BY d.doc_key
        FOR UPDATE OF d
    ), marked AS (
        UPDATE khala_import_documents AS d SET export_seq = :run, line = l.n
        FROM locked AS l
        WHERE d.source_table = :table AND d.doc_key = l.doc_key AND d.content_hash = l.h
          AND (d.export_seq < :run OR (d.export_seq = :run AND d.line <= l.n))
        RETURNING d.doc_key
    )
    SELECT l.doc_key, l.n, l.line, m.doc_key IS NOT NULL
    FROM locked AS l LEFT JOIN marked AS m ON m.doc_key = l.doc_key
    """
)


@dataclass(frozen=True, slots=True)
class Marking:
    """What the ledger said of a batch: the (key, line)s marked unchanged, and the keys whose
    stored version comes from a later line than this batch's (most likely a key this export
    lists again further on: only its last line counts, SPEC §8.2)."""

    unchanged: set[tuple[str, int]] = field(default_factory=set)
    later: set[str] = field(default_factory=set)


async def mark_unchanged(
    engine: AsyncEngine, table: str, run_id: int, documents: Sequence[tuple[str, str, int]]
) -> Marking:
    """Mark (key, content hash, line) documents whose stored content has that hash as seen in
    this run. The others are new or changed.

    The update only applies while the stored content still has that hash and an older
    position, so it commutes with the processors' own writes; a document it could not mark is
    published in full by the caller. A key twice in `documents` is marked at its last line.
    """
    if not documents:
        return Marking()
    last = {k: (h, n) for k, h, n in documents}  # in file order: the last line wins
    if engine.dialect.name == "postgresql":
        # One statement per batch: a round trip per document costs more than the work.
        params = {
            "run": run_id,
            "table": table,
            "keys": list(last),
            "hashes": [h for h, _ in last.values()],
            "lines": [n for _, n in last.values()],
        }
        marking = Marking()
        async with engine.begin() as conn:
            for key, line, stored_line, marked in (await conn.execute(_MARK_PG, params)).all():
                if marked:
                    marking.unchanged.add((key, int(line)))
                elif int(stored_line) > int(line):
                    marking.later.add(key)
        return marking
    c = DOCUMENTS.c
    update = (
        sa.update(DOCUMENTS)
        .where(
            c.source_table == table,
            c.doc_key == sa.bindparam("k"),
            c.content_hash == sa.bindparam("h"),
            sa.or_(
                c.export_seq < run_id,
                sa.and_(c.export_seq == run_id, c.line < sa.bindparam("n")),
            ),
        )
        .values(export_seq=run_id, line=sa.bindparam("n"))
    )
    async with engine.begin() as conn:
        before = await conn.execute(
            sa.select(c.doc_key, c.line).where(
                c.source_table == table, one_of(c.doc_key, list(last), engine.dialect.name)
            )
        )
        stored_lines = dict(before.tuples().all())
        await conn.execute(update, [{"k": k, "h": h, "n": n} for k, (h, n) in last.items()])
        result = await conn.execute(
            sa.select(c.doc_key, c.content_hash, c.line).where(
                c.source_table == table,
                c.export_seq == run_id,
                one_of(c.doc_key, list(last), engine.dialect.name),
            )
        )
        now = {k: (h, n) for k, h, n in result.all()}
    unchanged = {(k, n) for k, (h, n) in last.items() if now.get(k) == (h, n)}
    later = {
        k for k, (_, n) in last.items() if (k, n) not in unchanged and stored_lines.get(k, 0) > n
    }
    return Marking(unchanged, later)
