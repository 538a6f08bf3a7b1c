"""Re-imports of an unchanged export: when a derivation can be skipped, and what it reports.

A derivation is a function of the export's documents in their file order, the run's options
and the rows it wrote before (the row ledger and their presence in Laravel's tables). When every
document of this run is the one the previous derivation used, in the same order (ties go to the
later line), nothing vanished, the options are the same and every row recorded in the ledger is
still there, a full derivation would find every row settled and emit nothing (SPEC §5, §8.7).
So it is skipped: a re-import of an unchanged export costs the publisher's hashing and no pass
over the documents. Rows the database refused last time do not stand in the way: a derivation
does not offer a refused value again (`Derivation.refused_again`), and the same documents
compute the same values. Otherwise, and whenever in doubt (WorkOS lookups, which may answer
differently now; a refusal recorded without its value's hash: an update, or one recorded
before refusals kept their hashes), the full derivation runs.

The skipped run reports the previous run's counters of what was read, and zero for what a
derivation that finds everything settled does not do (create autopilots, upsert profiles and
policies, link older rows).
"""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from khala_stream import import_runs
from khala_stream.db.importer_tables import REFUSALS, ROWS
from khala_stream.db.laravel_tables import TABLES, primary_key
from processors.derive import COUNTER_KEYS, RunContext
from processors.store import TableChanges

__all__ = ["fingerprint", "reusable_counters", "rows_missing"]

# Counted only when the derivation writes something; zero when everything is settled.
_WRITES_ONLY = frozenset(
    {
        "autopilots_created",
        "autopilot_profiles_upserted",
        "autopilot_policies_upserted",
        "threads_linked_backfilled",
        "runs_linked_backfilled",
        "messages_linked_backfilled",
        "run_events_linked_backfilled",
    }
)
# How a ledger row is found in its table: (ledger column, table column); others by primary key.
_LOCATED_BY = {"users": ("row_key", "workos_id"), "run_events": ("row_id", "id")}


def fingerprint(context: RunContext) -> dict[str, Any]:
    """Everything besides documents and rows that a derivation's result depends on."""
    return {
        "snapshot_ms": context.snapshot_ms,
        "allowed_hosts": sorted(context.allowed_hosts),
        "skip_blueprints": context.options.skip_blueprints,
        "propagate_deletes": context.options.propagate_deletes,
        "resolve_workos_users": context.options.resolve_workos_users,
    }


async def reusable_counters(
    conn: AsyncConnection,
    run: import_runs.ImportRun,
    options: dict[str, Any],
    documents: dict[str, TableChanges],
) -> dict[str, int] | None:
    """The counters of this run if its derivation can be skipped (module docstring), else None.

    `documents`: the run's document statistics (`store.table_changes`).
    """
    if run.options.replace or options["resolve_workos_users"]:
        return None
    if any(c.inserted or c.updated or c.deleted for c in documents.values()):
        return None
    previous = await import_runs.latest_derived_before(conn, run.id)
    # The run just before: a run in between that was never derived may have changed documents.
    if previous is None or previous.id != run.id - 1 or previous.summary is None:
        return None
    summary = previous.summary
    if summary.fingerprint != options:
        return None
    if summary.scoped_threads is not None:
        return None  # its counters are those of the threads it derived, not the export's
    order = run.manifest.order if run.manifest is not None else None
    if not order or previous.manifest is None or previous.manifest.order != order:
        return None  # reordered (or published before the order was recorded)
    if any(c.get("deleted", 0) for c in summary.documents.values()):
        return None  # the previous derivation did not see every document of the ledger
    if await _unsettled_refusals(conn, previous.id) or await rows_missing(conn):
        return None
    return {
        key: 0 if key in _WRITES_ONLY else summary.counters.get(key, 0)
        for key in COUNTER_KEYS
        if not key.startswith("source_")
    }


async def _unsettled_refusals(conn: AsyncConnection, run_id: int) -> bool:
    """Whether the run refused a change a derivation would offer again: one without the
    refused value's hash (an update or delete, or recorded before refusals kept hashes)."""
    found = await conn.scalar(
        sa.select(sa.literal(1))
        .where(REFUSALS.c.run_id == run_id, REFUSALS.c.row_hash.is_(None))
        .limit(1)
    )
    return found is not None


async def rows_missing(conn: AsyncConnection) -> bool:
    """Whether a row the ledger records is gone from its table (deleted in Laravel).

    One anti-join per table, by the ledger's key; a table the ledger holds nothing of costs
    one index probe (a `DISTINCT dest_table` first would read the whole ledger). On
    PostgreSQL two tables are checked at a time, on a second connection beside `conn`: each
    anti-join reads the table's whole ledger, and a server process takes one core."""
    pending = list(TABLES)
    found: list[str] = []

    async def check(on: AsyncConnection) -> None:
        while pending and not found:
            name = pending.pop(0)
            if await on.scalar(_gone(name)) is not None:
                found.append(name)

    if conn.dialect.name != "postgresql":
        await check(conn)
    else:
        async with conn.engine.connect() as other:
            await asyncio.gather(check(conn), check(other))
    return bool(found)


def _gone(name: str) -> sa.Select[tuple[int]]:
    """A ledger entry of table `name` whose row is not in the table."""
    ledger_column, column = _LOCATED_BY.get(name, ("row_key", primary_key(name)))
    target = TABLES[name].c[column]
    ledger_value: Any = ROWS.c[ledger_column]
    if ledger_column == "row_key" and not isinstance(target.type, sa.String):
        ledger_value = sa.cast(ledger_value, target.type)
    return (
        sa.select(sa.literal(1))
        .where(ROWS.c.dest_table == name, ~sa.exists().where(target == ledger_value))
        .limit(1)
    )
