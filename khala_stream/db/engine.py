"""Engines for the Laravel database, and `db init` (SPEC §2).

PostgreSQL connections plan every statement with its parameters (see `create_engine`).
SQLite connections run in WAL mode with a 30 s busy timeout and foreign keys off (Laravel's
tables have none). The sqlite3 module's own transaction handling is switched off so that
SAVEPOINTs work, and every transaction starts with `BEGIN IMMEDIATE`: a read-then-write
transaction can then never fail half-way on a lock upgrade; concurrent writers queue on the
busy timeout instead.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from khala_stream.config import PORTS
from khala_stream.db.importer_tables import (
    DOCUMENT_LOOKUPS,
    DOCUMENTS,
    FOLLOW,
    IMPORTER,
    SOURCE_LINES,
)
from khala_stream.db.laravel_tables import LARAVEL
from khala_stream.db.queries import stored_before
from khala_stream.errors import UsageError

__all__ = [
    "create_engine",
    "create_lookups",
    "database_url",
    "dialect_name",
    "drop_lookups",
    "ensure_lookups",
    "indexes_built_after",
    "init_db",
]

_DRIVERS = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
}


_SUPPORTED = "use postgresql+asyncpg://… or sqlite+aiosqlite:///…"
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Taken by SQLAlchemy's asyncpg dialect itself, not passed on to asyncpg.connect().
_SQLALCHEMY_ASYNCPG_KEYS = ("prepared_statement_cache_size", "prepared_statement_name_func")


def database_url(url: str) -> sa.URL:
    """`url` parsed, with the async driver for plain `postgresql://` / `sqlite://`.

    Raises UsageError (exit 2) for a URL that is not one, another database, an in-memory SQLite
    database, or a SQLite file in a folder that does not exist; the message never repeats the
    URL (it may hold a password).
    """
    try:
        parsed = make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise UsageError(f"DATABASE_URL is not a database URL: {_SUPPORTED}") from None
    if parsed.port is not None and parsed.port not in PORTS:
        raise UsageError("DATABASE_URL: the port must be from 1 to 65535")
    parsed = parsed.set(drivername=_DRIVERS.get(parsed.drivername, parsed.drivername))
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite") or parsed.drivername not in _DRIVERS.values():
        raise UsageError(f"DATABASE_URL: unsupported database {parsed.drivername!r}: {_SUPPORTED}")
    if backend == "postgresql":
        parsed = _asyncpg_query(parsed)
    database = parsed.database or ""
    if backend == "sqlite" and (database in ("", ":memory:") or "mode=memory" in database):
        # Each stage is a process of its own, and each would see an empty database of its own.
        raise UsageError("DATABASE_URL: an in-memory SQLite database cannot be shared: name a file")
    if backend == "sqlite" and not database.startswith("file:"):
        folder = Path(database).expanduser().absolute().parent
        if not folder.is_dir():
            raise UsageError(f"DATABASE_URL: the SQLite file's folder does not exist: {folder}")
    return parsed


def _asyncpg_query(parsed: sa.URL) -> sa.URL:
    """The URL's query as asyncpg takes it: libpq's `sslmode` is asyncpg's `ssl`; a key asyncpg
    does not know is a UsageError here, not a TypeError at the first connection."""
    import asyncpg  # type: ignore[import-untyped]

    known = {*inspect.signature(asyncpg.connect).parameters, *_SQLALCHEMY_ASYNCPG_KEYS}
    query = dict(parsed.query)
    if "sslmode" in query and "ssl" not in query:
        query["ssl"] = query.pop("sslmode")
    if isinstance(query.get("ssl"), str) and query["ssl"] not in _SSL_MODES:
        raise UsageError(f"DATABASE_URL: sslmode must be one of {', '.join(_SSL_MODES)}")
    unknown = sorted(set(query) - known)
    if unknown:
        raise UsageError(
            f"DATABASE_URL: unknown parameter {unknown[0]!r} for PostgreSQL (asyncpg): use"
            " ssl=require, options asyncpg.connect() takes, or none"
        )
    return parsed.set(query=query)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url` (see `database_url`; UsageError for a bad one).

    Statements' parameters never appear in an error's text (`hide_parameters`): they hold
    emails, names and message text.
    """
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    kwargs.setdefault("hide_parameters", True)
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        # asyncpg prepares every statement, and PostgreSQL switches a prepared statement to a
        # generic plan after five runs. The importer's tables grow from empty to millions of
        # rows within one run, so a plan chosen early (a sequential scan of a tiny table)
        # would stay for good: plan each execution with its parameters instead.
        connect_args = kwargs.setdefault("connect_args", {})
        connect_args.setdefault("server_settings", {}).setdefault(
            "plan_cache_mode", "force_custom_plan"
        )
        return create_async_engine(parsed, **kwargs)
    engine = create_async_engine(parsed, **kwargs)
    _configure_sqlite(engine)
    return engine


_BUSY_TIMEOUT_S = 30


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine
    database = engine.url.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in database
    wal_set = in_memory  # WAL is a property of the file: once per engine is enough

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        nonlocal wal_set
        if not wal_set:
            # In a thread of its own, off the event loop: see `_switch_to_wal`.
            await_only(asyncio.to_thread(_switch_to_wal, database))
            wal_set = True
        # Autocommit at the sqlite3 level: SQLAlchemy's "begin" hook below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_S * 1000}")
            cursor.execute("PRAGMA foreign_keys = OFF")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _switch_to_wal(database: str) -> None:
    """Put the file in WAL mode (it stays so), retrying while another connection holds a lock.

    Switching a fresh file needs an exclusive lock, and SQLite answers "database is locked" at
    once, without waiting on its busy timeout, when other connections are opening or switching
    the same file (workers started together). This runs on a plain sqlite3 connection of its
    own: a statement that failed through aiosqlite leaves its cursor to the garbage collector,
    which may reset it on the event loop's thread while that connection waits on a lock held
    by another connection of this process, and the two then wait on each other.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    uri = database.startswith("file:")
    with closing(sqlite3.connect(database, timeout=_BUSY_TIMEOUT_S, uri=uri)) as conn:
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").close()
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


def dialect_name(
    bind: AsyncEngine | AsyncConnection | sa.engine.Dialect,
) -> Literal["postgresql", "sqlite"]:
    """`postgresql` or `sqlite` for an engine, a connection or a dialect."""
    dialect = bind if isinstance(bind, sa.engine.Dialect) else bind.dialect
    name = dialect.name
    if name == "postgresql":
        return "postgresql"
    if name == "sqlite":
        return "sqlite"
    raise ValueError(f"unsupported database dialect {name!r}")


_INIT_LOCK = 0x6B68616C61  # "khala": the advisory lock that serialises `init_db`


async def init_db(engine: AsyncEngine, *, laravel: bool = True) -> list[str]:
    """Create whichever tables are missing; returns those created. A Laravel table that exists
    is never altered; an importer table made by an earlier version is upgraded (`_upgrade`).

    With `laravel` the ten Laravel tables are created too where missing (empty databases:
    demos, tests); the importer's `khala_import_*` tables always are.
    """
    wanted = [*LARAVEL.sorted_tables] if laravel else []
    wanted += IMPORTER.sorted_tables

    def _create(conn: Connection) -> list[str]:
        existing = set(sa.inspect(conn).get_table_names())
        missing = [table for table in wanted if table.name not in existing]
        for table in missing:
            table.create(conn, checkfirst=True)
        for table in IMPORTER.sorted_tables:
            if table.name in existing:
                _upgrade(conn, table)
        if SOURCE_LINES.name not in existing and FOLLOW.name in existing:
            # An earlier version kept the followed state's lines in the mirror's rows: none
            # are known here, so the next step publishes the state whole, which numbers it.
            conn.execute(sa.update(FOLLOW).values(lines_run=None))
        return [table.name for table in missing]

    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Workers started together on a fresh database would race to create the same
            # tables (UniqueViolation on pg_type); one at a time, the others find them there.
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK})
        return await conn.run_sync(_create)


async def ensure_lookups(engine: AsyncEngine, tables: Sequence[str], run_id: int) -> bool:
    """Build the document store's lookup indexes (`DOCUMENT_LOOKUPS`) that are missing, once
    the store holds documents of `tables` from a run before `run_id`: True when they exist,
    False when nothing looks documents up by them yet (a first import)."""
    async with engine.begin() as conn:
        if not await conn.run_sync(_missing, DOCUMENTS.name, DOCUMENT_LOOKUPS):
            return True
        if not await stored_before(conn, tables, run_id):
            return False
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _INIT_LOCK})
        await create_lookups(conn, DOCUMENTS.name, DOCUMENT_LOOKUPS)
    return True


def _missing(conn: Connection, table: str, lookups: Mapping[str, Sequence[str]]) -> list[str]:
    have = {i["name"] for i in sa.inspect(conn).get_indexes(table)}
    return [name for name in lookups if name not in have]


async def create_lookups(
    conn: AsyncConnection, table: str, lookups: Mapping[str, Sequence[str]]
) -> None:
    """Create the indexes of `lookups` (name -> columns) on `table` that are missing, in the
    caller's transaction: indexes built once their table is filled, not row by row."""
    for name in await conn.run_sync(_missing, table, lookups):
        columns = ", ".join(lookups[name])
        await conn.execute(sa.text(f"CREATE INDEX {name} ON {table} ({columns})"))


async def drop_lookups(conn: AsyncConnection, names: Iterable[str]) -> None:
    """Drop the indexes named where present, in the caller's transaction (their table is
    about to be filled again, or nothing reads by them any more)."""
    for name in names:
        await conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))


@asynccontextmanager
async def indexes_built_after(conn: AsyncConnection, table: sa.Table) -> AsyncIterator[None]:
    """PostgreSQL: `table`'s primary key and indexes are dropped for the block and built
    again after it, in the caller's transaction (a failure rolls both back): a block that
    writes most of the table costs less with one sorted build of each than with every row
    kept in them. A row the block writes twice fails the build. Elsewhere: the block only."""
    if conn.dialect.name != "postgresql":
        yield
        return
    name = table.name
    key = await conn.run_sync(lambda sync: sa.inspect(sync).get_pk_constraint(name)["name"])
    indexes = {str(i.name): tuple(c.name for c in i.columns) for i in table.indexes}
    await conn.execute(sa.text(f"ALTER TABLE {name} DROP CONSTRAINT {key}"))
    await drop_lookups(conn, indexes)
    yield
    columns = ", ".join(c.name for c in table.primary_key.columns)
    await conn.execute(sa.text(f"ALTER TABLE {name} ADD CONSTRAINT {key} PRIMARY KEY ({columns})"))
    await create_lookups(conn, name, indexes)


def _upgrade(conn: Connection, table: sa.Table) -> None:
    """Add the columns and indexes an importer table gained since it was created. New
    columns are nullable, so the rows already there need nothing."""
    inspector = sa.inspect(conn)
    quote = conn.dialect.identifier_preparer.quote
    have = {c["name"] for c in inspector.get_columns(table.name)}
    for column in table.columns:
        if column.name in have:
            continue
        assert column.nullable, f"{table.name}.{column.name}: a new column must be nullable"
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(
            sa.text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}")
        )
    indexes = {i["name"] for i in inspector.get_indexes(table.name)}
    for index in table.indexes:
        if index.name not in indexes:
            index.create(conn)
