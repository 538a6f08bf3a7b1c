"""Query building shared by the stages."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from khala_stream.db.importer_tables import DOCUMENTS


def one_of(
    column: sa.ColumnElement[Any], values: Sequence[Any], dialect: str
) -> sa.ColumnElement[bool]:
    """`column IN (values)`; on PostgreSQL `= ANY(array)`, one parameter however many values
    (an expanding IN costs a bind parameter, and compile time, per value)."""
    if dialect == "postgresql":
        return column == sa.any_(sa.literal(list(values), type_=postgresql.ARRAY(column.type)))
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
    conn: AsyncConnection, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]
) -> AsyncIterator[str]:
    """PostgreSQL: `rows` binary-COPied into a temporary table shaped like `table`; yields its
    name for an `INSERT … SELECT`, and drops it after (at the latest when the transaction ends).
    `rows` is streamed: a generator keeps only asyncpg's send buffer in memory.

    The name depends only on (table, columns): asyncpg caches the column types of a COPY target
    by the text of its introspection query, i.e. by table name.
    """
    digest = hashlib.sha1("\0".join(columns).encode()).hexdigest()[:12]
    name = f"khala_stage_{table}_{digest}"
    quoted = f'"{name}"'
    await conn.execute(
        sa.text(f'CREATE TEMP TABLE {quoted} (LIKE "{table}" INCLUDING DEFAULTS) ON COMMIT DROP')
    )
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    await driver.copy_records_to_table(name, records=rows, columns=list(columns))
    yield name
    await conn.execute(sa.text(f"DROP TABLE {quoted}"))


async def json_row_type(
    conn: AsyncConnection, table: str, columns: Sequence[str], extra: Sequence[str]
) -> str:
    """PostgreSQL: a row type for `json_populate_recordset`: `columns` typed as in `table`, and
    the text columns `extra`. It is an empty temporary table, made once per session (a type
    would have to live in the application's schema); returns its quoted name. Members of a
    JSON object that are not columns are ignored; a JSON value lands in a `json` column as
    its exact text. It is asked for at each use rather than remembered: creating it is
    transactional, so a batch that rolls back takes it away again."""
    digest = hashlib.sha1("\0".join([*columns, "", *extra]).encode()).hexdigest()[:12]
    quoted = f'"khala_row_{table}_{digest}"'
    selected = ", ".join([*(f'"{c}"' for c in columns), *(f'NULL::text AS "{c}"' for c in extra)])
    await execute_counted(
        conn,
        f"CREATE TEMP TABLE IF NOT EXISTS {quoted} AS "
        f'SELECT {selected} FROM "{table}" WITH NO DATA',
    )
    return quoted


async def execute_counted(conn: AsyncConnection, sql: str, *args: Any) -> int:
    """PostgreSQL: `sql` with positional `$n` arguments, straight through the driver (no
    statement compilation, no result objects); the number of rows it wrote or returned."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    status = str(await driver.execute(sql, *args))
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0
