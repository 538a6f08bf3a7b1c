"""Query building shared by the stages."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection


def one_of(
    column: sa.ColumnElement[Any], values: Sequence[Any], dialect: str
) -> sa.ColumnElement[bool]:
    """`column IN (values)`; on PostgreSQL `= ANY(array)`, one parameter however many values
    (an expanding IN costs a bind parameter, and compile time, per value)."""
    if dialect == "postgresql":
        return column == sa.any_(sa.literal(list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


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


@contextlib.asynccontextmanager
async def staged_json(
    conn: AsyncConnection,
    table: str,
    columns: Sequence[str],
    extra: Sequence[str],
    arrays: Sequence[bytes],
) -> AsyncIterator[tuple[str, int]]:
    """PostgreSQL: `arrays`, JSON arrays of objects, parsed by the server into a temporary table
    of `columns` (typed as in `table`) and the text columns `extra`; yields its name and row
    count, and drops it after. Members of an object that are not columns are ignored; a JSON
    value lands in a `json` column as its exact text.
    """
    name = f"khala_rows_{table}"
    quoted = f'"{name}"'
    selected = ", ".join([*(f'"{c}"' for c in columns), *(f'NULL::text AS "{c}"' for c in extra)])
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    await driver.execute(
        f"CREATE TEMP TABLE {quoted} ON COMMIT DROP AS "
        f'SELECT {selected} FROM "{table}" WITH NO DATA'
    )
    count = 0
    for rows in arrays:
        status = await driver.execute(
            f"INSERT INTO {quoted} "
            f"SELECT * FROM json_populate_recordset(NULL::{quoted}, $1::text::json)",
            rows.decode(),
        )
        count += int(status.rsplit(" ", 1)[1])
    yield name, count
    await driver.execute(f"DROP TABLE {quoted}")
