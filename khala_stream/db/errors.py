"""Classify database failures: retry (transient), refuse the row (data), or stop (anything else).

Decisions are made from exception classes, PostgreSQL SQLSTATEs and SQLite result codes found
anywhere in the exception chain (SQLAlchemy wrapper -> adapted DB-API error -> driver error),
never from message text.
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Iterator
from typing import Final

import sqlalchemy.exc as sa_exc

__all__ = ["is_refusal", "is_transient", "refusal_reason", "sqlstate"]

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
    """The database's own short message, e.g. `value too long for type character varying(36)`."""
    for err in _chain(exc):
        if type(err).__module__.startswith("asyncpg"):
            # A server error's `message` is the primary message alone (no DETAIL, no class).
            message = getattr(err, "message", None)
            text = message if isinstance(message, str) and message else str(err)
            return text.strip().splitlines()[0] if text.strip() else type(err).__name__
        if isinstance(err, sqlite3.Error):
            return str(err)
    for err in _chain(exc):
        if not isinstance(err, sa_exc.SQLAlchemyError):
            text = str(err).strip()
            if text:
                return text.splitlines()[0]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
