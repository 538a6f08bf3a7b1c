"""Query building shared by the stages."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from khala_stream.db.errors import sqlstate
from khala_stream.db.importer_tables import DOCUMENTS


def one_of(
    column: sa.ColumnElement[Any], values: Sequence[Any], dialect: str
) -> sa.ColumnElement[bool]:
    """`column IN (values)`; on PostgreSQL `= ANY(array)`, one parameter however many values
    (an expanding IN costs a bind parameter, and compile time, per value). The array is of
    the column's type without its length: a cast to `varchar(36)[]` would cut a longer value
    to 36 characters, and find a row it does not name (a column widened since, a key too
    long for it)."""
    if dialect == "postgresql":
        kind = sa.String() if isinstance(column.type, sa.String) else column.type
        return column == sa.any_(sa.literal(list(values), type_=postgresql.ARRAY(kind)))
    return column.in_(values)


async def stored_before(conn: AsyncConnection, tables: Sequence[str], run_id: int) -> bool:
    """Whether the document store holds documents of any of `tables` from runs before
    `run_id`. When it holds none, this run's documents of them are all new: nothing to mark
    as unchanged (the publisher), nothing to upsert over (the processor's first COPY)."""
    c = DOCUMENTS.c
    found = sa.exists().where(
        one_of(c.source_table, tables, conn.dialect.name), c.export_seq < run_id
    )
    return bool(await conn.scalar(sa.select(found)))


def insert_for(conn: AsyncConnection, table: sa.TableClause) -> Any:
    """An INSERT with the dialect's ON CONFLICT clauses (PostgreSQL or SQLite)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


@contextlib.asynccontextmanager
async def staged(
    conn: AsyncConnection,
    table: str,
    columns: Sequence[str],
    rows: Iterable[tuple[Any, ...]],
    extra: Sequence[str] = (),
) -> AsyncIterator[str]:
    """PostgreSQL: `rows` binary-COPied into a temporary table of `columns`, typed as in
    `table`, followed by the text columns `extra`; yields its name for an `INSERT … SELECT`,
    and drops it after (at the latest when the transaction ends). `rows` is streamed: a
    generator keeps only asyncpg's send buffer in memory.

    The name depends only on (table, columns, extra): asyncpg caches the column types of a
    COPY target by the text of its introspection query, i.e. by table name.
    """
    digest = hashlib.sha1("\0".join([*columns, "", *extra]).encode()).hexdigest()[:12]
    name = f"khala_stage_{table}_{digest}"
    quoted = f'"{name}"'
    selected = ", ".join([*(f'"{c}"' for c in columns), *(f'NULL::text AS "{c}"' for c in extra)])
    # Through SQLAlchemy, not the driver: that begins the connection's transaction if needed.
    await conn.execute(
        sa.text(
            f'CREATE TEMP TABLE {quoted} ON COMMIT DROP AS SELECT {selected} FROM "{table}" '
            "WITH NO DATA"
        )
    )
    await copy_rows(conn, name, [*columns, *extra], rows)
    yield name
    await conn.execute(sa.text(f"DROP TABLE {quoted}"))


async def copy_rows(
    conn: AsyncConnection, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> None:
    """PostgreSQL: `rows` binary-COPied into `table` (streamed, when `rows` is a generator).
    Straight through the driver, which does not begin SQLAlchemy's transaction: the caller
    has begun it with a statement or a savepoint before, or the COPY commits on its own."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    await driver.copy_records_to_table(table, records=rows, columns=list(columns))


async def copy_new_rows(
    conn: AsyncConnection, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> bool:
    """PostgreSQL: `rows` binary-COPied straight into `table`, under a savepoint of the
    caller's transaction; False, with nothing written, when one of them is there already (a
    unique violation: the caller upserts them instead)."""
    try:
        async with conn.begin_nested():
            await copy_rows(conn, table, columns, rows)
    except Exception as exc:
        if sqlstate(exc) != _UNIQUE_VIOLATION:
            raise
        return False
    return True


_UNIQUE_VIOLATION: Final = "23505"


async def execute_counted(conn: AsyncConnection, sql: str, *args: Any) -> int:
    """PostgreSQL: `sql` with positional `$n` arguments, straight through the driver (no
    statement compilation, no result objects); the number of rows it wrote or returned."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    status = str(await driver.execute(sql, *args))
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0
