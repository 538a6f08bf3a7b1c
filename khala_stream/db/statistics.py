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

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Growth", "analyze"]


async def analyze(engine: AsyncEngine, tables: Sequence[str]) -> None:
    """ANALYZE `tables` (PostgreSQL; nothing on SQLite, whose planner needs no statistics for
    these lookups)."""
    if engine.dialect.name != "postgresql" or not tables:
        return
    async with engine.connect() as conn:
        await conn.execute(sa.text(f"ANALYZE {', '.join(sorted(set(tables)))}"))
        await conn.commit()


class Growth:
    """Counts rows a worker adds, by key, and ANALYZEs the key's tables (`tables_of(key)`)
    each time its count doubles, from `first_after` on: estimates stay within a factor of two
    for a few ANALYZEs per table."""

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
        self._added.update(by_key)

    async def refresh_if_due(self) -> None:
        due = [k for k, n in self._added.items() if n >= self._next.get(k, self._first_after)]
        if due:
            await analyze(self._engine, [t for k in due for t in self._tables_of(k)])
            for key in due:
                self._next[key] = 2 * self._added[key]
