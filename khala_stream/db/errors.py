"""Classify database failures: retry (transient), refuse the row (data), or stop (anything else).

Decisions are made from exception classes, PostgreSQL SQLSTATEs and SQLite result codes found
anywhere in the exception chain (SQLAlchemy wrapper -> adapted DB-API error -> driver error),
never from message text.
"""

from __future__ import annotations

import importlib
import re
import sqlite3
from collections.abc import Iterator
from typing import Final

import sqlalchemy.exc as sa_exc

__all__ = [
    "describe",
    "is_database_error",
    "is_refusal",
    "is_transient",
    "refusal_reason",
    "sqlstate",
]

# SQLite primary result codes (https://sqlite.org/rescode.html).
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_IOERR: Final = 10
_SQLITE_PROTOCOL: Final = 15
_SQLITE_TOOBIG: Final = 18
_SQLITE_CONSTRAINT: Final = 19
_SQLITE_MISMATCH: Final = 20
_SQLITE_RANGE: Final = 25
_SQLITE_TRANSIENT: Final = frozenset(
    {_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_PROTOCOL}
)
_SQLITE_REFUSAL: Final = frozenset(
    {_SQLITE_TOOBIG, _SQLITE_CONSTRAINT, _SQLITE_MISMATCH, _SQLITE_RANGE}
)

# SQLSTATEs worth a retry: connection exceptions, serialization failure, deadlock, statement
# completion unknown, lock not available, operator intervention (shutdown, query canceled),
# insufficient resources.
_TRANSIENT_CLASSES: Final = ("08", "53")
_TRANSIENT_STATES: Final = frozenset({"40001", "40P01", "40003", "55P03", "57014"})
_TRANSIENT_PREFIXES: Final = ("57P0",)
# Data exceptions and integrity constraint violations: this row is refused, not the batch.
_REFUSAL_CLASSES: Final = ("22", "23")

# OSError subclasses that are about files, not the network.
_FILESYSTEM_ERRORS: Final = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            todo.append(orig)
        if current.__cause__ is not None:
            todo.append(current.__cause__)
        if current.__context__ is not None:
            todo.append(current.__context__)


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried anywhere in the chain, if any."""
    for err in _chain(exc):
        for attr in ("sqlstate", "pgcode"):
            value = getattr(err, attr, None)
            if isinstance(value, str) and len(value) == 5:
                return value
    return None


def _sqlite_code(exc: BaseException) -> int | None:
    for err in _chain(exc):
        if isinstance(err, sqlite3.Error):
            code = getattr(err, "sqlite_errorcode", None)
            if isinstance(code, int):
                return code & 0xFF  # extended code -> primary code
    return None


def _asyncpg_classes(*names: str) -> tuple[type[BaseException], ...]:
    # asyncpg ships no type information: look its classes up dynamically.
    try:
        module = importlib.import_module("asyncpg.exceptions")
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return ()
    return tuple(getattr(module, name) for name in names)


# asyncpg's own DataError: a value it could not encode for its column (raised client-side,
# no SQLSTATE). Its connection-closed error carries no SQLSTATE either.
_ASYNCPG_DATA_ERRORS: Final = _asyncpg_classes("DataError")
_ASYNCPG_CONNECTION_ERRORS: Final = _asyncpg_classes("ConnectionDoesNotExistError")


def is_transient(exc: BaseException) -> bool:
    """True when the same work may succeed if retried: connection trouble, contention."""
    state = sqlstate(exc)
    if state is not None:
        return (
            state.startswith(_TRANSIENT_CLASSES)
            or state in _TRANSIENT_STATES
            or state.startswith(_TRANSIENT_PREFIXES)
        )
    code = _sqlite_code(exc)
    if code is not None:
        return code in _SQLITE_TRANSIENT
    for err in _chain(exc):
        if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, sa_exc.DisconnectionError | sa_exc.TimeoutError):
            return True  # pool checkout failures
        if isinstance(err, ConnectionError | TimeoutError):
            return True
        if isinstance(err, OSError) and not isinstance(err, _FILESYSTEM_ERRORS):
            return True  # socket errors, DNS failures, asyncpg's "Multiple exceptions"
        if isinstance(err, _ASYNCPG_CONNECTION_ERRORS):
            return True
    return False


def is_refusal(exc: BaseException) -> bool:
    """True when the database refused the data itself (22xxx, 23xxx; SQLite constraint...).

    Such an error is about one row: the sink sets that row aside and writes the rest. Any other
    non-transient error (missing table, syntax) is a fault of the deployment and propagates.
    """
    state = sqlstate(exc)
    if state is not None:
        return state.startswith(_REFUSAL_CLASSES)
    code = _sqlite_code(exc)
    if code is not None:
        return code in _SQLITE_REFUSAL
    return any(isinstance(err, _ASYNCPG_DATA_ERRORS) for err in _chain(exc))


def refusal_reason(exc: BaseException) -> str:
    """The database's own short message without any value, e.g. `value too long for type
    character varying(36)`: it goes to logs, the dead-letter topic and `--json` (see
    `describe`)."""
    return _message(exc)


def describe(exc: BaseException) -> str:
    """One line about a database failure that names the SQLSTATE, table, column and
    constraint and never a value: safe for logs, errors and the dead-letter topic.

    SQLAlchemy's text of an error carries the statement's parameters and asyncpg's carries the
    server's DETAIL (`Key (email)=(...) already exists`), both personal data; this builds the
    line from the structured fields and the primary message only. Other errors (broker,
    network) are described by their own first line.
    """
    if not is_database_error(exc):
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    where = []
    state = sqlstate(exc)
    if state is not None:
        where.append(f"SQLSTATE {state}")
    for err in _chain(exc):
        for attr in ("table_name", "column_name", "constraint_name"):
            value = getattr(err, attr, None)
            if isinstance(value, str) and value:
                where.append(f"{attr.removesuffix('_name')} {value}")
        if where[1:]:
            break
    message = _message(exc)
    return f"{message} ({', '.join(where)})" if where else message


def is_database_error(exc: BaseException) -> bool:
    """True when a database driver's or SQLAlchemy's error is anywhere in the chain."""
    return any(
        isinstance(err, sa_exc.SQLAlchemyError | sqlite3.Error)
        or type(err).__module__.startswith("asyncpg")
        for err in _chain(exc)
    )


# A value the message quotes: anything in quotes, or after the first `: ` of a data exception
# (`invalid input syntax for type integer: "x"`, `... argument $3: 'x' (expected str, got int)`).
_QUOTED: Final = re.compile(r"'[^']*'|\"[^\"]*\"")
_ARGUMENT: Final = re.compile(r"^(invalid input for query argument \$(\d+))(?: in element .*?)?: ")
_INSERT: Final = re.compile(r"INSERT INTO (\w+) \(([^)]*)\) VALUES \(([^)]*)\)", re.I)


def _message(exc: BaseException) -> str:
    for err in _chain(exc):
        if type(err).__module__.startswith("asyncpg"):
            # A server error's `message` is the primary message alone (no DETAIL, no class).
            message = getattr(err, "message", None)
            text = (
                message
                if isinstance(message, str) and message
                else str(err.args[0] if err.args else "")
            )
            text = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            if _ARGUMENT.match(text):  # asyncpg's own, raised before the server saw it
                return _client_data_error(exc, err, text)
            state = getattr(err, "sqlstate", None)
            if isinstance(state, str) and state.startswith("22"):
                return _without_values(err, text)
            return text
        if isinstance(err, sqlite3.Error):
            return str(err)  # SQLite names columns and constraints, never values
    for err in _chain(exc):
        if not isinstance(err, sa_exc.SQLAlchemyError):
            text = str(err).strip()
            if text:
                return _QUOTED.sub("'…'", text.splitlines()[0])
    return type(exc).__name__


def _without_values(err: BaseException, text: str) -> str:
    """A data exception's message with quoted values dropped; identifiers the error names in
    its fields (table, column, constraint, type) stay."""
    names = {
        getattr(err, a, None)
        for a in ("table_name", "column_name", "constraint_name", "data_type_name")
    }
    kept = _QUOTED.sub(lambda m: m.group() if m.group()[1:-1] in names else "…", text)
    head, _, _ = kept.partition(": ")
    return head


def _client_data_error(exc: BaseException, err: BaseException, text: str) -> str:
    """asyncpg's own `invalid input for query argument $3: 'value' (expected str, got int)`:
    the argument's column (from the INSERT statement) and the kind of problem, no value."""
    match = _ARGUMENT.match(text)
    assert match is not None
    head = match.group(1)
    statement = next(
        (e.statement for e in _chain(exc) if isinstance(e, sa_exc.StatementError) and e.statement),
        None,
    )
    insert = _INSERT.search(statement or "")
    if insert is not None:
        columns = [c.strip().strip('"') for c in insert.group(2).split(",")]
        values = [v.strip().split("::")[0] for v in insert.group(3).split(",")]  # `$3::INTEGER`
        position = f"${match.group(2)}"
        if position in values and len(values) == len(columns):
            head = f"invalid input for {insert.group(1)}.{columns[values.index(position)]}"
    cause = err.__cause__
    if cause is None:
        return head
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    kind = detail if detail and not _QUOTED.search(detail) else type(cause).__name__
    return f"{head} ({kind})"
