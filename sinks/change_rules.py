"""What a change may do to the database: the sink's answer to a forged changes topic.

Anyone who can write to `<prefix>.changes` could otherwise name any table the database role
reaches (`TRUNCATE migrations CASCADE`, say). A change is applied only when it names one of
the ten Laravel tables, one of the four operations, and columns that table has; only the six
chat tables that `--replace` empties may be truncated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, get_args

from khala_stream.contract import DESTINATION_TABLES, REPLACED_TABLES, ChangeOp, RowChange
from khala_stream.db.laravel_tables import TABLES

_OPS: Final[frozenset[str]] = frozenset(get_args(ChangeOp))
_TABLES: Final[frozenset[str]] = frozenset(DESTINATION_TABLES)
_TRUNCATED: Final[frozenset[str]] = frozenset(REPLACED_TABLES)
_COLUMNS: Final[dict[str, frozenset[str]]] = {
    t: frozenset(c.name for c in TABLES[t].columns) for t in DESTINATION_TABLES
}


def forbidden_table(table: str, columns: Iterable[str]) -> str | None:
    """Why rows of `table` with these columns must not be written, or None."""
    if table not in _TABLES:
        return f"table {table[:64]!r} is not one of the ten the importer writes"
    unknown = sorted(set(columns) - _COLUMNS[table])
    if unknown:
        return f"unknown column {table}.{unknown[0][:64]}" + (
            f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        )
    return None


def forbidden(change: RowChange) -> str | None:
    """Why `change` must not be applied, or None when the sink may apply it."""
    if change.op not in _OPS:
        return f"unknown operation {str(change.op)[:32]!r} on {str(change.table)[:64]!r}"
    if (why := forbidden_table(change.table, change.values)) is not None:
        return why
    if change.op == "truncate" and change.table not in _TRUNCATED:
        return f"truncate of {change.table} refused: only the six chat tables are ever emptied"
    return None
