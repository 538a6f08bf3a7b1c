"""Incremental publishing: which documents the ledger already holds with the same content."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.importer_tables import DOCUMENTS


async def stored_hashes(engine: AsyncEngine, table: str, keys: Sequence[str]) -> dict[str, str]:
    """Content hash per document key, for the keys the ledger knows."""
    if not keys:
        return {}
    c = DOCUMENTS.c
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.select(c.doc_key, c.content_hash).where(c.source_table == table, c.doc_key.in_(keys))
        )
        return dict(result.tuples().all())
