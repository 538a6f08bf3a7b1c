"""Incremental publishing: the ledger of documents already imported, by content hash.

A document whose content is unchanged is not published again: the publisher marks its ledger
row as part of the new export instead (SPEC §5), so the processors derive from it as before.
"""

from __future__ import annotations

from collections.abc import Sequence

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


async def mark_unchanged(
    engine: AsyncEngine, table: str, run_id: int, documents: Sequence[tuple[str, str, int]]
) -> set[str]:
    """Mark (key, content hash, line) documents as seen in this run; returns the keys marked.

    The update only applies while the stored content still has that hash and an older
    position, so it commutes with the processors' own writes; a document it could not mark is
    published in full by the caller.
    """
    if not documents:
        return set()
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
        await conn.execute(update, [{"k": k, "h": h, "n": n} for k, h, n in documents])
        result = await conn.execute(
            sa.select(c.doc_key, c.content_hash, c.line).where(
                c.source_table == table,
                c.export_seq == run_id,
                one_of(c.doc_key, [k for k, _, _ in documents], engine.dialect.name),
            )
        )
        now = {k: (h, n) for k, h, n in result.all()}
    return {k for k, h, n in documents if now.get(k) == (h, n)}
