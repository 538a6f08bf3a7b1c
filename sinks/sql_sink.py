"""The idempotent sink: applies a batch of row changes, and the consumer offsets that produced
them, in one database transaction.

Row keys (`RowChange.key`):
- most tables: the primary key value;
- `users`: upserts are keyed by `workos_id` and carry the explicit `id` (reserved beforehand);
  an update or delete may name the row by its numeric id (`"42"` or `"id:42"`) or `workos_id`;
- `run_events`: upserts are keyed by the receipt key and carry no `id`: the sink reuses the id
  recorded in the row ledger while that row exists, or allocates a new one; `"id:<n>"` names
  the row with that numeric id.

Every upsert also records the row in the row ledger (`khala_import_rows`). A row the database
refuses (over-long value, constraint violation) is set aside as a `Refusal` and recorded in
`khala_import_refusals` (once per run and row, with the refused value's row hash, so that
later runs do not offer the same value again); the rest of the batch is still written.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream.contract.changes import RowChange
from khala_stream.contract.codec import CheckedRowBatch, dumps_text, row_batch_changes
from khala_stream.db.errors import is_refusal, is_transient, refusal_reason
from khala_stream.db.importer_tables import OFFSETS, REFUSALS, ROWS
from khala_stream.db.laravel_tables import (
    TABLES,
    boolean_columns,
    json_columns,
    primary_key,
    timestamp_columns,
)
from khala_stream.db.offsets import advance
from khala_stream.db.queries import copy_rows, execute_counted, one_of, staged
from sinks.dialects import SqlDialect, dialect_for

__all__ = ["ApplyResult", "OffsetAdvance", "Refusal", "SqlSink"]

_LEDGER_COLUMNS: Final = ("dest_table", "row_key", "row_hash", "row_id", "run_id")
_LEDGER_KEY: Final = ("dest_table", "row_key")
_ID_TABLES: Final = frozenset({"users", "run_events"})  # bigint ids recorded as ledger row_id
_CHUNK: Final = 500


@dataclass(frozen=True, slots=True)
class OffsetAdvance:
    group: str
    topic: str
    partition: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Refusal:
    change: RowChange
    reason: str


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: bool  # False: the batch was already applied by another worker; rolled back
    # Changes applied per table (a truncate counts as one).
    rows: dict[str, int] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)


OnRefused = Callable[[list[Refusal]], Awaitable[None]]


@dataclass(slots=True)
class _Plan:
    """What a batch writes: the last change per (table, key); a truncate voids its table's
    earlier changes and is applied first."""

    truncates: dict[str, RowChange] = field(default_factory=dict)
    tables: dict[str, dict[str, RowChange]] = field(default_factory=dict)

    def add(self, changes: Iterable[RowChange]) -> None:
        for change in changes:
            if change.op == "truncate":
                self.tables.pop(change.table, None)
                self.truncates[change.table] = change
                continue
            bucket = self.tables.setdefault(change.table, {})
            bucket[change.key] = _merge(bucket.pop(change.key, None), change)


@dataclass(slots=True)
class _Prepared:
    change: RowChange
    values: dict[str, Any]  # converted for the driver; for upserts includes the primary key
    where: tuple[str, Any] | None = None  # update/delete: (column, value); None = no such row
    row_id: int | None = None  # ledger row_id of an upsert


class _BadChange(Exception):
    """A change that cannot be turned into SQL at all (unknown column, malformed value)."""


def _merge(previous: RowChange | None, change: RowChange) -> RowChange:
    if previous is None or change.op != "update":
        return change
    if previous.op == "delete":
        return previous  # nothing left to update
    # An update after an upsert or an update of the same row: one write with both.
    return replace(previous, values={**previous.values, **change.values}, run_id=change.run_id)


class SqlSink:
    """Writes batches of `RowChange`s; replaying a batch is safe (see module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def apply(
        self,
        changes: Sequence[RowChange],
        *,
        batches: Sequence[CheckedRowBatch] = (),
        offsets: Sequence[OffsetAdvance] = (),
        on_refused: OnRefused | None = None,
    ) -> ApplyResult:
        # (1) De-duplicate: the last change per (table, key) wins; a truncate voids its table's
        #     earlier changes and is applied first.
        plan = _Plan()
        plan.add(changes)
        async with self._engine.connect() as conn:
            tx = await conn.begin()
            try:
                # Cheap early exit for a replayed batch; step (5) stays the authority.
                if await _already_applied(conn, offsets):
                    await tx.rollback()
                    return ApplyResult(applied=False)
                dialect = dialect_for(conn)
                # (2) + (3) Write table by table; refused rows are set aside.
                rows, refused = await _write_all(conn, dialect, plan, batches)
                if fresh := await _unrecorded(conn, refused):
                    await _record_refusals(conn, fresh)
                    # (4) Dead letters are published (and acknowledged) before offsets move.
                    if on_refused is not None:
                        await on_refused(fresh)
                # (5) Move every offset, conditionally: another worker may have been first.
                for adv in offsets:
                    moved = await advance(
                        conn, adv.group, adv.topic, adv.partition, adv.start, adv.end
                    )
                    if not moved:
                        await tx.rollback()
                        return ApplyResult(applied=False)
                # (6) Commit.
                await tx.commit()
            except BaseException:
                if tx.is_active:
                    with contextlib.suppress(Exception):
                        await tx.rollback()
                raise
        return ApplyResult(applied=True, rows=rows, refused=refused)


async def _already_applied(conn: AsyncConnection, offsets: Sequence[OffsetAdvance]) -> bool:
    for adv in offsets:
        stored = await conn.scalar(
            sa.select(OFFSETS.c.next_offset).where(
                OFFSETS.c.consumer_group == adv.group,
                OFFSETS.c.topic == adv.topic,
                OFFSETS.c.partition == adv.partition,
            )
        )
        if stored is not None and int(stored) > adv.start:
            return True
    return False


_BatchKind = tuple[int, str, tuple[str, ...], bool]  # run, table, columns, new


async def _write_all(
    conn: AsyncConnection, dialect: SqlDialect, plan: _Plan, batches: Sequence[CheckedRowBatch]
) -> tuple[dict[str, int], list[Refusal]]:
    rows: Counter[str] = Counter()
    refused: list[Refusal] = []
    for change in plan.truncates.values():
        await dialect.truncate(conn, change.table)
        await conn.execute(sa.delete(ROWS).where(ROWS.c.dest_table == change.table))
        rows[change.table] += 1
    alike: defaultdict[_BatchKind, list[CheckedRowBatch]] = defaultdict(list)
    for checked in batches:
        b = checked.batch
        alike[(b.run_id, b.table, b.columns, b.new)].append(checked)
    for group in alike.values():
        written = await _write_batches(conn, dialect, group)
        if written is None:
            for checked in group:  # row by row, with the other changes
                plan.add(row_batch_changes(checked))
        else:
            rows[group[0].batch.table] += written
    for table, bucket in plan.tables.items():
        changes = list(bucket.values())
        prepared, bad = await _prepare(conn, dialect, table, changes)
        refused += bad
        if not prepared:
            continue
        try:
            async with conn.begin_nested():
                await _write_table(conn, dialect, table, prepared, bulk=True)
            rows[table] += len(prepared)
            continue
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(prepared) == 1:  # already one at a time
                if not is_refusal(exc):
                    raise
                refused.append(Refusal(prepared[0].change, refusal_reason(exc)))
                continue
        # (3) The table's write failed for good: retry its changes one at a time.
        for item in prepared:
            try:
                async with conn.begin_nested():
                    await _write_table(conn, dialect, table, [item], bulk=False)
                rows[table] += 1
            except Exception as exc:
                if is_transient(exc) or not is_refusal(exc):
                    raise
                refused.append(Refusal(item.change, refusal_reason(exc)))
    return dict(rows), refused


async def _write_batches(
    conn: AsyncConnection, dialect: SqlDialect, batches: list[CheckedRowBatch]
) -> int | None:
    """PostgreSQL: `RowBatch`es of one run, table, column set and newness, binary-COPied
    straight into a table that was empty (`_copy_new`), or else into a staging table and
    upserted from there with their ledger rows in one statement; their row count. None:
    they go row by row instead (another database, ids the sink must look up, an unknown
    column, or a statement that failed: a refused row, a key twice)."""
    first = batches[0].batch
    table, columns = first.table, list(first.columns)
    # Run events carry no id: new ones take the next ids of the table's sequence here; the
    # ids of rows written before are in the ledger, and looked up row by row.
    allocate = table == "run_events" and first.new and "id" not in columns
    if (
        dialect.name != "postgresql"
        or (table in _ID_TABLES and not allocate)
        or (primary_key(table) not in columns and not allocate)
        or not set(columns) <= _column_kinds(table).keys()
    ):
        return None
    if first.new and not allocate and (written := await _copy_new(conn, dialect, batches)):
        return written
    # Rows of a table that was empty: plain INSERTs first (an upsert costs PostgreSQL a
    # quarter more, the ledger's half more); a row already there makes it upsert after all,
    # or, for run events, go row by row (their ids are in the ledger).
    attempts = (False,) if allocate else (False, True) if first.new else (True,)
    records = _batch_records(dialect, table, columns, batches)
    try:
        # The COPY in a savepoint of its own: a row it refuses undoes only the staging.
        async with (
            conn.begin_nested(),
            staged(conn, table, columns, records, extra=("_k", "_h")) as stage,
        ):
            for upsert in attempts:
                try:
                    async with conn.begin_nested():
                        sql = _batch_sql(dialect, table, columns, stage, upsert, allocate)
                        return await execute_counted(conn, sql, table, first.run_id)
                except Exception as exc:
                    if is_transient(exc):
                        raise
    except Exception as exc:
        if is_transient(exc):
            raise
    return None


async def _copy_new(
    conn: AsyncConnection, dialect: SqlDialect, batches: Sequence[CheckedRowBatch]
) -> int | None:
    """Rows of a table that was empty COPied straight into it, and their entries into the
    ledger: half the work of staging them first and inserting from there. None, with
    nothing written, when the table or the ledger refuses one (a row already there: the
    caller upserts instead)."""
    first = batches[0].batch
    table, columns = first.table, first.columns
    entries: list[tuple[Any, ...]] = []
    rows = _batch_records(dialect, table, columns, batches, ledger=(entries, first.run_id))
    try:
        async with conn.begin_nested():
            await copy_rows(conn, table, columns, rows)
            await copy_rows(conn, ROWS.name, _LEDGER_COLUMNS, entries)
    except Exception as exc:
        if is_transient(exc):
            raise
        return None
    return len(entries)


def _batch_records(
    dialect: SqlDialect,
    table: str,
    columns: Sequence[str],
    batches: Sequence[CheckedRowBatch],
    *,
    ledger: tuple[list[tuple[Any, ...]], int] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """The batches' rows as the driver takes them: a COPY costs PostgreSQL a third less than
    parsing the same rows from JSON. Each row ends with its ledger key and hash, or, given
    `ledger` (entries, run), its ledger entry goes to the entries instead."""
    kinds = _column_kinds(table)
    plan = [(name, kinds[name]) for name in columns]
    entries, run_id = ledger if ledger is not None else (None, None)
    for checked in batches:
        for values in checked.rows:
            row = [_value(dialect, kind, values.get(name)) for name, kind in plan]
            if entries is None:
                row += (values["_k"], values["_h"])
            else:
                entries.append((table, values["_k"], values["_h"], None, run_id))
            yield tuple(row)


def _batch_sql(
    dialect: SqlDialect,
    table: str,
    columns: Sequence[str],
    stage: str,
    upsert: bool,
    allocate: bool,
) -> str:
    """One statement: the staged rows inserted into the table and their ledger entries into
    the ledger (overwriting what is there when `upsert`; with ids from the table's sequence
    when `allocate`). $1 is the table's name, $2 the run."""
    cols = dialect.column_list(columns)
    on_table = dialect.on_conflict(columns, (primary_key(table),)) if upsert else ""
    on_ledger = dialect.on_conflict(_LEDGER_COLUMNS, _LEDGER_KEY) if upsert else ""
    source, ids, row_id = dialect.quote(stage), "", "NULL"
    if allocate:
        # The sequence is looked up once per statement (an init plan), not once per row; the
        # ids are drawn once, for the table and the ledger alike.
        sequence = f"(SELECT pg_get_serial_sequence('{table}', 'id')::regclass)"
        ids = f"r AS MATERIALIZED (SELECT nextval({sequence}) AS id, s.* FROM {source} AS s), "
        source, row_id, cols = "r", "id", f"id, {cols}"
    return (
        f"WITH {ids}w AS ("
        f"INSERT INTO {dialect.quote(table)} ({cols}) SELECT {cols} FROM {source} {on_table}) "
        f"INSERT INTO {ROWS.name} ({dialect.column_list(_LEDGER_COLUMNS)}) "
        f"SELECT $1::text, _k, _h, {row_id}, $2::integer FROM {source} {on_ledger}"
    )


@functools.cache
def _column_kinds(table: str) -> dict[str, str]:
    """Each column of `table` by how its values are converted: json, time, bool or plain."""
    json_cols, time_cols = json_columns(table), timestamp_columns(table)
    bool_cols = boolean_columns(table)
    return {
        c.name: "json"
        if c.name in json_cols
        else "time"
        if c.name in time_cols
        else "bool"
        if c.name in bool_cols
        else "plain"
        for c in TABLES[table].columns
    }


def _value(dialect: SqlDialect, kind: str, value: Any) -> Any:
    """A contract value of a column of this kind, as the driver takes it."""
    if value is None or kind == "plain":
        return value
    if kind == "json":
        return dumps_text(value)
    if kind == "time":
        return dialect.timestamp(value)
    return bool(value)


def _convert(dialect: SqlDialect, table: str, values: dict[str, Any]) -> dict[str, Any]:
    kinds = _column_kinds(table)
    out: dict[str, Any] = {}
    for name, value in values.items():
        kind = kinds.get(name)
        if kind is None:
            raise _BadChange(f"unknown column {table}.{name}")
        try:
            out[name] = _value(dialect, kind, value)
        except (TypeError, ValueError) as exc:
            # The kind of problem, never the value: reasons go to logs and dead letters.
            raise _BadChange(
                f"invalid {kind} value for {table}.{name} ({type(exc).__name__})"
            ) from exc
    return out


def _locate(table: str, pk: str, key: str) -> tuple[str, Any] | None:
    """The (column, value) an update or delete addresses; None: a run event by receipt key."""
    number = key.removeprefix("id:")
    numeric = int(number) if number.isdigit() else None
    if table == "run_events":
        return ("id", numeric) if key.startswith("id:") and numeric is not None else None
    if table == "users":
        return ("id", numeric) if numeric is not None else ("workos_id", key)
    return (pk, key)


def ledger_lookup(
    table: str, keys: Sequence[str], dialect: str = "postgresql"
) -> sa.Select[tuple[str, int]]:
    """The row ids the ledger holds for these keys of `table`."""
    c = ROWS.c
    return sa.select(c.row_key, c.row_id).where(
        c.dest_table == table, one_of(c.row_key, keys, dialect), c.row_id.is_not(None)
    )


async def _ledger_ids(conn: AsyncConnection, table: str, keys: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for i in range(0, len(keys), _CHUNK):
        query = ledger_lookup(table, keys[i : i + _CHUNK], conn.dialect.name)
        found.update({str(k): int(v) for k, v in (await conn.execute(query)).all()})
    return found


async def _existing_ids(conn: AsyncConnection, table: str, ids: list[int]) -> set[int]:
    found: set[int] = set()
    id_col = TABLES[table].c.id
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        result = await conn.execute(
            sa.select(id_col).where(one_of(id_col, chunk, conn.dialect.name))
        )
        found.update(int(v) for v in result.scalars())
    return found


async def _prepare(
    conn: AsyncConnection, dialect: SqlDialect, table: str, changes: list[RowChange]
) -> tuple[list[_Prepared], list[Refusal]]:
    """Convert values and find which row each change addresses (allocating run_events ids)."""
    pk = primary_key(table)
    prepared: list[_Prepared] = []
    refused: list[Refusal] = []
    for change in changes:
        try:
            values = _convert(dialect, table, change.values)
        except _BadChange as exc:
            refused.append(Refusal(change, str(exc)))
            continue
        item = _Prepared(change, values)
        if change.op == "upsert":
            if table == "users" and "id" not in values:
                refused.append(Refusal(change, "users upsert without its reserved id"))
                continue
            if table != "run_events":
                values.setdefault(pk, change.key)
        else:
            item.where = _locate(table, pk, change.key)
        prepared.append(item)
    if table == "run_events":
        await _resolve_run_event_ids(conn, dialect, prepared)
    if table in _ID_TABLES:
        for item in prepared:
            if item.change.op == "upsert":
                item.row_id = int(item.values["id"])
    return prepared, refused


async def _resolve_run_event_ids(
    conn: AsyncConnection, dialect: SqlDialect, prepared: list[_Prepared]
) -> None:
    by_key = [p for p in prepared if p.where is None and "id" not in p.values]
    ledger = await _ledger_ids(conn, "run_events", [p.change.key for p in by_key])
    alive = await _existing_ids(conn, "run_events", sorted(set(ledger.values())))
    fresh: list[_Prepared] = []
    for item in by_key:
        known = ledger.get(item.change.key)
        if item.change.op == "upsert":
            if known is not None and known in alive:
                item.values["id"] = known
            else:
                fresh.append(item)
        elif known is not None:
            item.where = ("id", known)
    new_ids = await dialect.allocate_ids(conn, "run_events", len(fresh))
    for item, new_id in zip(fresh, new_ids, strict=True):
        item.values["id"] = new_id


async def _write_table(
    conn: AsyncConnection,
    dialect: SqlDialect,
    table: str,
    items: list[_Prepared],
    *,
    bulk: bool,
) -> None:
    quoted = dialect.quote(table)
    deletes = [p for p in items if p.change.op == "delete"]
    upserts = [p for p in items if p.change.op == "upsert"]
    updates = [p for p in items if p.change.op == "update"]

    by_column: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in deletes:
        if p.where is not None:
            by_column[p.where[0]].append({"k": p.where[1]})
    for column, params in by_column.items():
        sql = f"DELETE FROM {quoted} WHERE {dialect.quote(column)} = :k"
        await conn.execute(sa.text(sql), params)
    if deletes:
        await conn.execute(
            sa.text("DELETE FROM khala_import_rows WHERE dest_table = :t AND row_key = :k"),
            [{"t": table, "k": p.change.key} for p in deletes],
        )

    table_columns = [c.name for c in TABLES[table].columns]
    by_shape: defaultdict[tuple[str, ...], list[_Prepared]] = defaultdict(list)
    for p in upserts:
        by_shape[tuple(p.values)].append(p)  # rows of a table are built with one key order
    for columns, group in by_shape.items():
        rows = [tuple(p.values.values()) for p in group]
        await dialect.upsert(conn, table, columns, (primary_key(table),), rows, bulk=bulk)
    if upserts:
        ledger = [
            (table, p.change.key, p.change.row_hash, p.row_id, p.change.run_id) for p in upserts
        ]
        await dialect.upsert(conn, ROWS.name, _LEDGER_COLUMNS, _LEDGER_KEY, ledger, bulk=bulk)

    by_update: defaultdict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = defaultdict(list)
    for p in updates:
        if p.where is not None and p.values:
            columns = tuple(c for c in table_columns if c in p.values)
            bound = {f"p{i}": p.values[c] for i, c in enumerate(columns)}
            by_update[(p.where[0], columns)].append({**bound, "k": p.where[1]})
    for (column, columns), params_list in by_update.items():
        sets = ", ".join(f"{dialect.quote(c)} = :p{i}" for i, c in enumerate(columns))
        sql = f"UPDATE {quoted} SET {sets} WHERE {dialect.quote(column)} = :k"
        await conn.execute(sa.text(sql), params_list)


async def _unrecorded(conn: AsyncConnection, refused: list[Refusal]) -> list[Refusal]:
    """The refusals not recorded yet. A run derived again after a crash emits the rows it
    emitted before, and a row refused then is refused again: it is set aside once."""
    if not refused:
        return []
    c = REFUSALS.c
    result = await conn.execute(
        sa.select(c.run_id, c.dest_table, c.row_key).where(
            c.run_id.in_(sorted({r.change.run_id for r in refused}))
        )
    )
    recorded = {(int(run), table, key) for run, table, key in result.all()}
    return [r for r in refused if (r.change.run_id, r.change.table, r.change.key) not in recorded]


async def _record_refusals(conn: AsyncConnection, refused: list[Refusal]) -> None:
    now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    await conn.execute(
        sa.insert(REFUSALS),
        [
            {
                "run_id": r.change.run_id,
                "dest_table": r.change.table,
                "row_key": r.change.key,
                "reason": r.reason,
                "created_at": now,
                "row_hash": r.change.row_hash if r.change.op == "upsert" else None,
            }
            for r in refused
        ],
    )
