"""Query building shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any, BinaryIO, Final

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
    await _until_lost(
        driver, driver.copy_records_to_table(table, records=rows, columns=list(columns))
    )


async def _until_lost(driver: Any, operation: Awaitable[object]) -> None:
    """`operation` on asyncpg connection `driver`, ended by the connection's loss.

    asyncpg's COPY IN waits for the socket to take more data without watching for the loss
    (`writing_allowed` is never set again): a server gone in the middle of a COPY would keep
    it waiting for ever. The loss cancels it here and raises ConnectionResetError, which the
    callers' retries wait out as any lost connection."""
    work = asyncio.ensure_future(operation)
    lost = False

    def on_loss(_: object) -> None:
        nonlocal lost
        lost = True
        work.cancel()

    driver.add_termination_listener(on_loss)
    try:
        await work
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not lost or (current is not None and current.cancelling()):
            raise
        raise ConnectionResetError(
            "the database connection was lost in the middle of a COPY"
        ) from None
    finally:
        driver.remove_termination_listener(on_loss)


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


async def copy_out_lines(conn: AsyncConnection, sql: str, *args: Any, out: BinaryIO) -> int:
    """PostgreSQL: the values of the one text column `sql` selects (none NULL), one a line,
    written to `out` as the server sends them (`COPY … TO STDOUT`, straight through the
    driver: no row objects); the number of lines. COPY's text escapes are undone, so a line
    is the value's UTF-8 bytes."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    rest, lines = b"", 0

    async def take(chunk: bytes) -> None:
        nonlocal rest, lines
        block = rest + chunk
        end = block.rfind(b"\n") + 1  # a raw newline only ends a row: an escape has none
        rest = block[end:]
        whole = block[:end]
        lines += whole.count(b"\n")
        out.write(_unescaped(whole))

    await driver.copy_from_query(sql, *args, output=take)
    if rest:
        raise ValueError("COPY ended inside a row")
    return lines


_COPY_ESCAPE: Final = re.compile(rb"\\(.)", re.DOTALL)
_COPY_ESCAPES: Final = {
    b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f", b"v": b"\v"
}  # fmt: skip


def _unescape(match: re.Match[bytes]) -> bytes:
    return _COPY_ESCAPES[match.group(1)]


def _unescaped(block: bytes) -> bytes:
    """`block` of COPY text rows with its escapes undone. JSON text has no control character,
    so its rows escape only backslashes: when every backslash is half of a doubled one, one
    replace does (a `\\x` escape would leave the count of pairs short of half); else the
    regex, which calls back per escape."""
    slashes = block.count(b"\\")
    if not slashes:
        return block
    if block.count(b"\\\\") * 2 == slashes:
        return block.replace(b"\\\\", b"\\")
    return _COPY_ESCAPE.sub(_unescape, block)


async def execute_counted(conn: AsyncConnection, sql: str, *args: Any) -> int:
    """PostgreSQL: `sql` with positional `$n` arguments, straight through the driver (no
    statement compilation, no result objects); the number of rows it wrote or returned."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    status = str(await driver.execute(sql, *args))
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0
