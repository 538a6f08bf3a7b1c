"""What differs between PostgreSQL and SQLite when the sink writes: bulk upserts, truncation,
id allocation for `run_events`, and the Python type of timestamp values.

PostgreSQL bulk upserts go through COPY (asyncpg's binary `copy_records_to_table`) into a
temporary staging table shaped like the target, then one `INSERT ... SELECT ... ON CONFLICT DO
UPDATE`. SQLite uses `INSERT ... ON CONFLICT DO UPDATE` with executemany.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from khala_stream.db.queries import staged

__all__ = ["PostgresDialect", "SqlDialect", "SqliteDialect", "dialect_for", "parse_timestamp"]

Row = tuple[Any, ...]

TIMESTAMP_FORMAT: Final = "%Y-%m-%d %H:%M:%S"


def parse_timestamp(value: Any) -> datetime:
    """A contract timestamp (`YYYY-MM-DD HH:MM:SS`, UTC) as a naive UTC datetime, floored to
    whole seconds (the columns are `timestamp(0)`, SPEC §3.3)."""
    if type(value) is str and len(value) == 19:  # the contract's own form: nothing to adjust
        return datetime.fromisoformat(value)
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        parsed = datetime.fromisoformat(value)
    else:
        raise ValueError(f"not a timestamp: {value!r}")
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed.replace(microsecond=0)


class SqlDialect(ABC):
    """The dialect-specific half of the sink. One instance per connection's dialect."""

    name: str

    def __init__(self, dialect: sa.engine.Dialect) -> None:
        self._preparer = dialect.identifier_preparer

    def quote(self, identifier: str) -> str:
        return str(self._preparer.quote(identifier))

    def column_list(self, columns: Sequence[str]) -> str:
        return ", ".join(self.quote(c) for c in columns)

    def on_conflict(self, columns: Sequence[str], conflict: Sequence[str]) -> str:
        updates = [c for c in columns if c not in conflict]
        target = f"ON CONFLICT ({self.column_list(conflict)})"
        if not updates:
            return f"{target} DO NOTHING"
        sets = ", ".join(f"{self.quote(c)} = excluded.{self.quote(c)}" for c in updates)
        return f"{target} DO UPDATE SET {sets}"

    @abstractmethod
    def timestamp(self, value: Any) -> Any:
        """A contract timestamp as this driver must receive it."""

    @abstractmethod
    async def truncate(self, conn: AsyncConnection, table: str) -> None:
        """Empty `table` and reset its id counter."""

    @abstractmethod
    async def upsert(
        self,
        conn: AsyncConnection,
        table: str,
        columns: Sequence[str],
        conflict: Sequence[str],
        rows: Sequence[Row],
        *,
        bulk: bool,
    ) -> None:
        """Insert-or-overwrite `rows` (values in `columns` order) keyed by `conflict`."""

    @abstractmethod
    async def allocate_ids(self, conn: AsyncConnection, table: str, count: int) -> list[int]:
        """Reserve `count` fresh ids of `table`'s auto-increment `id`."""


class PostgresDialect(SqlDialect):
    name = "postgresql"

    def timestamp(self, value: Any) -> Any:
        return parse_timestamp(value)

    async def truncate(self, conn: AsyncConnection, table: str) -> None:
        await conn.execute(sa.text(f"TRUNCATE {self.quote(table)} RESTART IDENTITY CASCADE"))

    async def upsert(
        self,
        conn: AsyncConnection,
        table: str,
        columns: Sequence[str],
        conflict: Sequence[str],
        rows: Sequence[Row],
        *,
        bulk: bool,
    ) -> None:
        if not rows:
            return
        cols = self.column_list(columns)
        tail = self.on_conflict(columns, conflict)
        if not bulk or len(rows) == 1:
            binds = ", ".join(f":p{i}" for i in range(len(columns)))
            sql = f"INSERT INTO {self.quote(table)} ({cols}) VALUES ({binds}) {tail}"
            params = [{f"p{i}": v for i, v in enumerate(row)} for row in rows]
            await conn.execute(sa.text(sql), params)
            return
        async with staged(conn, table, columns, rows) as stage:
            await conn.execute(
                sa.text(
                    f"INSERT INTO {self.quote(table)} ({cols}) "
                    f"SELECT {cols} FROM {self.quote(stage)} {tail}"
                )
            )

    async def allocate_ids(self, conn: AsyncConnection, table: str, count: int) -> list[int]:
        if count <= 0:
            return []
        result = await conn.execute(
            sa.text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
            {"t": table, "n": count},
        )
        return [int(value) for (value,) in result.all()]


class SqliteDialect(SqlDialect):
    name = "sqlite"

    def timestamp(self, value: Any) -> Any:
        # Kept as the exact text Laravel stores on SQLite.
        return parse_timestamp(value).strftime(TIMESTAMP_FORMAT)

    async def _has_sequence_table(self, conn: AsyncConnection) -> bool:
        found = await conn.scalar(
            sa.text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'")
        )
        return found is not None

    async def truncate(self, conn: AsyncConnection, table: str) -> None:
        await conn.execute(sa.text(f"DELETE FROM {self.quote(table)}"))
        if await self._has_sequence_table(conn):
            await conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})

    async def upsert(
        self,
        conn: AsyncConnection,
        table: str,
        columns: Sequence[str],
        conflict: Sequence[str],
        rows: Sequence[Row],
        *,
        bulk: bool,
    ) -> None:
        if not rows:
            return
        marks = ", ".join("?" for _ in columns)
        sql = (
            f"INSERT INTO {self.quote(table)} ({self.column_list(columns)}) VALUES ({marks}) "
            f"{self.on_conflict(columns, conflict)}"
        )
        await conn.exec_driver_sql(sql, list(rows))

    async def allocate_ids(self, conn: AsyncConnection, table: str, count: int) -> list[int]:
        """max(id, sqlite_sequence) + 1 ...; moving sqlite_sequence reserves them, since
        AUTOINCREMENT never hands out an id at or below it."""
        if count <= 0:
            return []
        quoted = self.quote(table)
        top = await conn.scalar(sa.text(f"SELECT coalesce(max(id), 0) FROM {quoted}"))
        seq: Any = None
        if await self._has_sequence_table(conn):
            seq = await conn.scalar(
                sa.text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}
            )
        start = max(int(top or 0), int(seq or 0)) + 1
        ids = list(range(start, start + count))
        if seq is None:
            await conn.execute(
                sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :s)"),
                {"t": table, "s": ids[-1]},
            )
        else:
            await conn.execute(
                sa.text("UPDATE sqlite_sequence SET seq = :s WHERE name = :t"),
                {"t": table, "s": ids[-1]},
            )
        return ids


def dialect_for(conn: AsyncConnection) -> SqlDialect:
    name = conn.dialect.name
    if name == "postgresql":
        return PostgresDialect(conn.dialect)
    if name == "sqlite":
        return SqliteDialect(conn.dialect)
    raise ValueError(f"unsupported database dialect {name!r}")
