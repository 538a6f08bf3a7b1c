"""Every row of the ten Laravel tables, normalised so that two correct runs compare equal.

Normalisation (and nothing more):

- wall-clock bookkeeping columns are dropped: `created_at` / `updated_at` of `autopilots`,
  `autopilot_profiles` and `autopilot_policies` (the reference puts "now" there);
- `run_events.id` is dropped (the sink allocates it; events are identified by content) and
  events are sorted by (run_id, created_at, type, canonical payload JSON), then by the rest;
- JSON columns are decoded and re-encoded canonically (sorted keys, compact), so that the
  comparison is by value (SPEC §3.12); SQL NULL stays None, JSON `null` becomes "null";
- timestamps become 'YYYY-MM-DD HH:MM:SS' strings, booleans bools;
- every other table is sorted by its primary key, which is always its first column here.

`users` keeps every column, ids included: reserved user ids must not depend on arrival order,
worker count or crashes either.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from khala_stream.contract.tables import DESTINATION_TABLES
from khala_stream.db.engine import create_engine
from khala_stream.db.laravel_tables import (
    TABLES,
    boolean_columns,
    json_columns,
    primary_key,
    timestamp_columns,
)

__all__ = [
    "SNAPSHOT_TABLES",
    "Snapshot",
    "assert_same_tables",
    "diff_tables",
    "snapshot_columns",
    "table_snapshot",
]

SNAPSHOT_TABLES: tuple[str, ...] = DESTINATION_TABLES
_WALL_CLOCK = ("created_at", "updated_at")
DROPPED: dict[str, frozenset[str]] = {
    "autopilots": frozenset(_WALL_CLOCK),
    "autopilot_profiles": frozenset(_WALL_CLOCK),
    "autopilot_policies": frozenset(_WALL_CLOCK),
    "run_events": frozenset({"id"}),
}

Row = tuple[Any, ...]
Snapshot = dict[str, list[Row]]


def snapshot_columns(table: str) -> list[str]:
    """The columns a snapshot row holds, in order (the primary key first, when kept)."""
    dropped = DROPPED.get(table, frozenset())
    names = [c.name for c in TABLES[table].columns if c.name not in dropped]
    pk = primary_key(table)
    if pk in names:
        names.remove(pk)
        names.insert(0, pk)
    return names


def _canonical_json(text: Any) -> str | None:
    if text is None:
        return None
    if isinstance(text, bytes | bytearray | memoryview):
        text = bytes(text).decode()
    value = orjson.loads(text)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _timestamp(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, date):
        return value.strftime("%Y-%m-%d 00:00:00")
    return str(value)[:19]


def _normalise(table: str, column: str, value: Any) -> Any:
    if column in json_columns(table):
        return _canonical_json(value)
    if column in timestamp_columns(table):
        return _timestamp(value)
    if column in boolean_columns(table):
        return None if value is None else bool(value)
    return value


def _sort_key(row: Row) -> tuple[tuple[int, Any], ...]:
    """Total order over rows holding None, numbers and strings."""
    out: list[tuple[int, Any]] = []
    for v in row:
        if v is None:
            out.append((0, ""))
        elif isinstance(v, bool | int | float):
            out.append((1, v))
        else:
            out.append((2, str(v)))
    return tuple(out)


def _event_key(columns: Sequence[str]) -> Any:
    first = [columns.index(c) for c in ("run_id", "created_at", "type", "payload")]

    def key(row: Row) -> tuple[tuple[tuple[int, Any], ...], tuple[tuple[int, Any], ...]]:
        return _sort_key(tuple(row[i] for i in first)), _sort_key(row)

    return key


async def _snapshot(db_url: str, tables: Sequence[str]) -> Snapshot:
    engine = create_engine(db_url)
    out: Snapshot = {}
    try:
        async with engine.connect() as conn:
            present = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
            for table in tables:
                if table not in present:
                    out[table] = []
                    continue
                t = TABLES[table]
                columns = snapshot_columns(table)
                # JSON read as text on every backend, so that decoding is ours, not the driver's.
                selected = [
                    sa.cast(t.c[c], sa.Text).label(c) if c in json_columns(table) else t.c[c]
                    for c in columns
                ]
                result = await conn.execute(sa.select(*selected))
                rows = [
                    tuple(_normalise(table, c, v) for c, v in zip(columns, r, strict=True))
                    for r in result.all()
                ]
                if table == "run_events":
                    rows.sort(key=_event_key(columns))
                else:
                    rows.sort(key=_sort_key)
                out[table] = rows
    finally:
        await engine.dispose()
    return out


def table_snapshot(db_url: str, tables: Sequence[str] = SNAPSHOT_TABLES) -> Snapshot:
    """Every row of the Laravel tables of `db_url`, normalised (see the module docstring)."""
    return asyncio.run(_snapshot(db_url, tables))


def _show(columns: Sequence[str], row: Row) -> str:
    parts = []
    for c, v in zip(columns, row, strict=True):
        text = repr(v)
        parts.append(f"{c}={text if len(text) <= 80 else text[:77] + '...'}")
    return "(" + ", ".join(parts) + ")"


def diff_tables(
    expected: Mapping[str, list[Row]], actual: Mapping[str, list[Row]], limit: int = 5
) -> str:
    """A readable account of where two snapshots differ; empty when they are equal."""
    lines: list[str] = []
    for table in sorted(set(expected) | set(actual), key=_table_order):
        a, b = expected.get(table, []), actual.get(table, [])
        if a == b:
            continue
        columns = snapshot_columns(table) if table in TABLES else [str(i) for i in range(99)]
        lines.append(f"{table}: expected {len(a)} rows, got {len(b)}")
        keyed = table in TABLES and columns[0] == primary_key(table)
        if not keyed:
            only_a = list((Counter(a) - Counter(b)).elements())
            only_b = list((Counter(b) - Counter(a)).elements())
            for label, rows in (("missing", only_a), ("unexpected", only_b)):
                for row in rows[:limit]:
                    lines.append(f"  {label}: {_show(columns, row)}")
                if len(rows) > limit:
                    lines.append(f"  ... {len(rows) - limit} more {label}")
            continue
        by_pk_a = {r[0]: r for r in a}
        by_pk_b = {r[0]: r for r in b}
        missing = [k for k in by_pk_a if k not in by_pk_b]
        extra = [k for k in by_pk_b if k not in by_pk_a]
        changed = [k for k in by_pk_a if k in by_pk_b and by_pk_a[k] != by_pk_b[k]]
        for k in missing[:limit]:
            lines.append(f"  missing: {_show(columns, by_pk_a[k])}")
        if len(missing) > limit:
            lines.append(f"  ... {len(missing) - limit} more missing")
        for k in extra[:limit]:
            lines.append(f"  unexpected: {_show(columns, by_pk_b[k])}")
        if len(extra) > limit:
            lines.append(f"  ... {len(extra) - limit} more unexpected")
        for k in changed[:limit]:
            ra, rb = by_pk_a[k], by_pk_b[k]
            cols = [
                f"{c}: {va!r} != {vb!r}"
                for c, va, vb in zip(columns, ra, rb, strict=True)
                if va != vb
            ]
            lines.append(f"  differs {columns[0]}={k!r}: " + "; ".join(cols))
        if len(changed) > limit:
            lines.append(f"  ... {len(changed) - limit} more differing rows")
    return "\n".join(lines)


def _table_order(table: str) -> tuple[int, str]:
    return (SNAPSHOT_TABLES.index(table) if table in SNAPSHOT_TABLES else 99, table)


def assert_same_tables(
    expected: Mapping[str, list[Row]], actual: Mapping[str, list[Row]], context: str = ""
) -> None:
    """Fails with the first differing rows of each table (expected = the baseline)."""
    diff = diff_tables(expected, actual)
    if diff:
        head = f"{context}\n" if context else ""
        raise AssertionError(f"{head}tables differ from the baseline:\n{diff}")
