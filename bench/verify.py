"""What a path left in its database: row counts, content fingerprints, rows written since a mark.

- `counts`: rows per destination table.
- `fingerprints`: per table, an md5 over its rows in key order, leaving out what legitimately
  differs between two correct imports: the wall-clock bookkeeping columns (autopilots,
  profiles and policies `created_at` / `updated_at`, reference §5) and `run_events.id` (allocated
  by the writer). Equal fingerprints mean the two paths wrote the same rows.
- `written_since`: rows whose `xmin` is at or after a transaction id taken before a run, i.e.
  rows that run inserted or updated (an UPDATE that writes identical values still counts).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from khala_stream.contract.tables import DESTINATION_TABLES
from khala_stream.db.importer_tables import IMPORTER
from khala_stream.db.laravel_tables import TABLES, primary_key

__all__ = ["counts", "fingerprints", "mark", "written_since"]

_WALL_CLOCK: Final = {
    "autopilots": {"created_at", "updated_at"},
    "autopilot_profiles": {"created_at", "updated_at"},
    "autopilot_policies": {"created_at", "updated_at"},
    "run_events": {"id"},
}


async def _fetch(dsn: str, statements: list[str]) -> list[Any]:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        return [await conn.fetchval(s) for s in statements]
    finally:
        await conn.close()


def _query(dsn: str, statements: list[str]) -> list[Any]:
    return asyncio.run(_fetch(dsn, statements))


def counts(dsn: str) -> dict[str, int]:
    values = _query(dsn, [f'SELECT count(*) FROM "{t}"' for t in DESTINATION_TABLES])
    return {t: int(v) for t, v in zip(DESTINATION_TABLES, values, strict=True)}


def fingerprints(dsn: str) -> dict[str, str]:
    statements = []
    for table in DESTINATION_TABLES:
        skip = _WALL_CLOCK.get(table, set())
        cols = [c.name for c in TABLES[table].columns if c.name not in skip]
        row = "ROW(" + ", ".join(f'"{c}"' for c in cols) + ")::text"
        order = row if table == "run_events" else f'"{primary_key(table)}"'
        statements.append(
            f"SELECT md5(coalesce(string_agg(md5({row}), '' ORDER BY {order}), '')) "
            f'FROM "{table}"'
        )
    values = _query(dsn, statements)
    return {t: str(v) for t, v in zip(DESTINATION_TABLES, values, strict=True)}


def mark(dsn: str) -> int:
    """The next transaction id: every row written after this has an xmin at or above it."""
    # A fresh cluster never wraps around, so the 32-bit xmin compares with the xid directly.
    return int(_query(dsn, ["SELECT txid_current() % 4294967296"])[0]) + 1


def written_since(dsn: str, xid: int, *, importer: bool = False) -> dict[str, int]:
    """Rows per table with xmin ≥ `xid` (the Laravel tables, or the importer's own)."""
    tables = sorted(IMPORTER.tables) if importer else list(DESTINATION_TABLES)
    values = _query(
        dsn,
        [f'SELECT count(*) FROM "{t}" WHERE xmin::text::bigint >= {xid}' for t in tables],
    )
    return {t: int(v) for t, v in zip(tables, values, strict=True) if v or not importer}


def deadlocks(dsn: str) -> int:
    """Deadlocks PostgreSQL has detected in this database since the server started."""
    query = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    return int(_query(dsn, [query])[0] or 0)
