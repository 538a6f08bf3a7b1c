"""PostgreSQL statistics of the tables an import fills from nothing within one run.

Autovacuum analyzes a table some time after it grew; an import fills the document store, the
row ledger and the Laravel tables faster than that, and until then the planner takes them for
a handful of rows: a lookup of 500 keys by primary key becomes a scan of every row stored so
far, once per batch. Measured at 1M documents: the publisher's marking scanned the store
(most of its time), and the sink's ledger lookups for run events took 32 ms each instead of
one. The stages therefore ANALYZE what they fill, each time it has doubled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.importer_tables import DOCUMENTS, IMPORTER_TABLES, ROWS

__all__ = ["Growth", "analyze"]


async def analyze(engine: AsyncEngine, tables: Sequence[str]) -> None:
    """ANALYZE `tables` (PostgreSQL; nothing on SQLite, whose planner needs no statistics for
    these lookups), the importer's own without the columns no query looks rows up by."""
    if engine.dialect.name != "postgresql" or not tables:
        return
    targets = [_target(table) for table in sorted(set(tables))]
    async with engine.connect() as conn:
        await conn.execute(sa.text(f"ANALYZE {', '.join(targets)}"))
        await conn.commit()


# The widest values of the importer's tables, which no plan depends on: their statistics are
# a fifth of an ANALYZE of the store (the documents' text, the 64-hex hashes).
_UNPLANNED: Final[Mapping[str, frozenset[str]]] = {
    DOCUMENTS.name: frozenset({"document", "content_hash", "doc_id"}),
    ROWS.name: frozenset({"row_hash"}),
}


def _target(table: str) -> str:
    left_out = _UNPLANNED.get(table)
    if left_out is None:
        return table
    columns = [c.name for c in IMPORTER_TABLES[table].columns if c.name not in left_out]
    return f"{table} ({', '.join(columns)})"


class Growth:
    """Counts the rows a worker adds to each table (a row of `key` lands in each of
    `tables_of(key)`) and ANALYZEs a table each time its count has doubled, from `first_after`
    on: estimates stay within a factor of two for a few ANALYZEs per table, however many keys
    fill it."""

    def __init__(
        self,
        engine: AsyncEngine,
        tables_of: Callable[[str], Sequence[str]],
        first_after: int = 10_000,
    ) -> None:
        self._engine = engine
        self._tables_of = tables_of
        self._first_after = first_after
        self._added: Counter[str] = Counter()
        self._next: dict[str, int] = {}

    def added(self, by_key: Mapping[str, int]) -> None:
        for key, n in by_key.items():
            for table in self._tables_of(key):
                self._added[table] += n

    async def refresh_if_due(self) -> None:
        due = [t for t, n in self._added.items() if n >= self._next.get(t, self._first_after)]
        if due:
            await analyze(self._engine, due)
            for table in due:
                self._next[table] = 2 * self._added[table]
