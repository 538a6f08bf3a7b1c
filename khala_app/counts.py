"""The runbook's before/after snapshot: row counts of the Laravel tables, linkage included.

The runbook's step 4 counts eight tables and the rows of four chat tables that carry an
autopilot; `khala-stream counts` takes that snapshot, and with `--before FILE` (a snapshot saved
earlier with `counts --json`) prints what changed, so the before/after check is one command
each. The counts are read-only and taken in one statement, so they describe one moment even
while an import writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.contract.tables import DESTINATION_TABLES
from khala_stream.db.laravel_tables import TABLES
from khala_stream.errors import UsageError

__all__ = [
    "EXTRA_TABLES",
    "LINKED_TABLES",
    "RUNBOOK_TABLES",
    "CountsDiff",
    "Snapshot",
    "diff",
    "load_snapshot",
    "snapshot",
]

# The runbook's eight tables: the Laravel tables but the autopilot profiles and policies.
EXTRA_TABLES: Final = ("autopilot_profiles", "autopilot_policies")
RUNBOOK_TABLES: Final = tuple(t for t in DESTINATION_TABLES if t not in EXTRA_TABLES)
LINKED_TABLES: Final = ("threads", "runs", "messages", "run_events")
"""Tables whose `<table>_with_autopilot` count is their rows with an autopilot_id."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    taken_at: str
    """ISO 8601, UTC."""
    tables: dict[str, int | None]
    """Rows per table; None for a table the database does not have."""
    linkage: dict[str, int | None]
    """`<table>_with_autopilot`: rows whose autopilot_id is set."""

    def to_json(self) -> dict[str, Any]:
        return {"taken_at": self.taken_at, "tables": self.tables, "linkage": self.linkage}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        """A snapshot from `counts --json` output (a diff's `after` part is accepted too)."""
        if "after" in data and "tables" not in data:
            data = data["after"]
        try:
            return cls(
                taken_at=str(data.get("taken_at", "")),
                tables={str(k): _count(v) for k, v in data["tables"].items()},
                linkage={str(k): _count(v) for k, v in data["linkage"].items()},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a counts snapshot: {exc}") from exc

    def lines(self) -> list[str]:
        lines = [f"counts at {self.taken_at}"]
        lines += [f"  {name + ':':<32} {_show(n)}" for name, n in self.tables.items()]
        lines += [f"  {name + ':':<32} {_show(n)}" for name, n in self.linkage.items()]
        return lines


@dataclass(frozen=True, slots=True, kw_only=True)
class CountsDiff:
    before: Snapshot
    after: Snapshot
    difference: dict[str, int | None]
    """after - before for every table and linkage count; None where either side is missing."""

    @property
    def changed(self) -> dict[str, int]:
        return {k: v for k, v in self.difference.items() if v}

    def to_json(self) -> dict[str, Any]:
        return {
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "difference": self.difference,
        }

    def lines(self) -> list[str]:
        both = {**self.before.tables, **self.before.linkage}
        now = {**self.after.tables, **self.after.linkage}
        lines = [f"counts {self.before.taken_at} -> {self.after.taken_at}"]
        for name, delta in self.difference.items():
            change = "?" if delta is None else f"{delta:+d}"
            lines.append(
                f"  {name + ':':<32} {_show(both.get(name)):>10} -> {_show(now.get(name)):>10}"
                f"  ({change})"
            )
        return lines


def _count(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"a count must be an integer, not {value!r}")
    return value


def _show(value: int | None) -> str:
    return "missing" if value is None else str(value)


def _statement(present: set[str]) -> tuple[sa.Select[Any], list[str]]:
    # One SELECT of scalar subqueries: every count sees the same moment, on any database.
    columns: list[sa.Label[Any]] = []
    for name in (*RUNBOOK_TABLES, *EXTRA_TABLES):
        if name in present:
            table = TABLES[name]
            query = sa.select(sa.func.count()).select_from(table).scalar_subquery()
            columns.append(query.label(name))
    for name in LINKED_TABLES:
        if name in present:
            table = TABLES[name]
            query = (
                sa.select(sa.func.count())
                .select_from(table)
                .where(table.c.autopilot_id.is_not(None))
                .scalar_subquery()
            )
            columns.append(query.label(f"{name}_with_autopilot"))
    return sa.select(*columns), [c.name for c in columns]


async def snapshot(engine: AsyncEngine) -> Snapshot:
    """Count the rows now. Reads only; a table the database lacks counts as None."""

    def _take(conn: Connection) -> dict[str, int]:
        present = set(sa.inspect(conn).get_table_names())
        statement, names = _statement(present)
        if not names:
            return {}
        row = conn.execute(statement).one()
        return {name: int(row._mapping[name]) for name in names}

    async with engine.connect() as conn:
        found = await conn.run_sync(_take)
        await conn.rollback()
    return Snapshot(
        taken_at=datetime.now(UTC).isoformat(timespec="seconds"),
        tables={name: found.get(name) for name in (*RUNBOOK_TABLES, *EXTRA_TABLES)},
        linkage={
            f"{name}_with_autopilot": found.get(f"{name}_with_autopilot") for name in LINKED_TABLES
        },
    )


def diff(before: Snapshot, after: Snapshot) -> CountsDiff:
    """What changed between two snapshots, count by count."""
    old = {**before.tables, **before.linkage}
    new = {**after.tables, **after.linkage}
    difference: dict[str, int | None] = {}
    for name in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(name), new.get(name)
        difference[name] = None if a is None or b is None else b - a
    return CountsDiff(before=before, after=after, difference=difference)


def load_snapshot(path: Path) -> Snapshot:
    """A snapshot saved with `counts --json`; a missing or malformed file is a UsageError."""
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"--before {path}: cannot read: {exc.strerror or exc}") from exc
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--before {path}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--before {path}: not a counts snapshot")
    try:
        return Snapshot.from_json(data)
    except ValueError as exc:
        raise UsageError(f"--before {path}: {exc}") from exc
