"""Incremental publishing: the ledger of documents already imported, by content hash.

A document whose content is unchanged is not published again: the publisher marks its ledger
row as part of the new export instead (SPEC §5), so the processors derive from it as before.
"""

from __future__ import annotations

from collections.abc import Sequence
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


_MARK_PG: Final = sa.text(
    """
    UPDATE khala_import_documents AS d SET export_seq = :run, line = v.n
    FROM unnest(CAST(:keys AS text[]), CAST(:hashes AS text[]), CAST(:lines AS integer[]))
         AS v(k, h, n)
    WHERE d.source_table = :table AND d.doc_key = v.k AND d.content_hash = v.h
      AND (d.export_seq < :run OR (d.export_seq = :run AND d.line <= v.n))
    RETURNING d.doc_key, d.line
    """
)


async def mark_unchanged(
    engine: AsyncEngine, table: str, run_id: int, documents: Sequence[tuple[str, str, int]]
) -> set[tuple[str, int]]:
    """Mark (key, content hash, line) documents whose stored content has that hash as seen in
    this run; returns the (key, line) pairs marked. The others are new or changed.

    The update only applies while the stored content still has that hash and an older
    position, so it commutes with the processors' own writes; a document it could not mark is
    published in full by the caller. A key twice in `documents` is marked at its last line.
    """
    if not documents:
        return set()
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
        async with engine.begin() as conn:
            return {(k, int(n)) for k, n in (await conn.execute(_MARK_PG, params)).all()}
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
        await conn.execute(update, [{"k": k, "h": h, "n": n} for k, (h, n) in last.items()])
        result = await conn.execute(
            sa.select(c.doc_key, c.content_hash, c.line).where(
                c.source_table == table,
                c.export_seq == run_id,
                one_of(c.doc_key, list(last), engine.dialect.name),
            )
        )
        now = {k: (h, n) for k, h, n in result.all()}
    return {(k, n) for k, (h, n) in last.items() if now.get(k) == (h, n)}
