"""Read-side look-ups of the Laravel database that the policies need, and user id reservations.

`TargetView` answers in batches, so the derivation makes one round trip per few hundred rows.
With `--replace`, the six chat tables read as empty (SPEC §8.9), since they are about to be.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream.contract.tables import REPLACED_TABLES
from khala_stream.db.errors import sqlstate
from khala_stream.db.importer_tables import REFUSALS, ROWS, USER_IDS
from khala_stream.db.laravel_tables import TABLES, primary_key
from khala_stream.db.queries import one_of

_CHUNK = 2000
_INSUFFICIENT_PRIVILEGE = "42501"
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ExistingUser:
    id: int
    workos_id: str
    name: str
    email: str
    avatar: str
    handle: str | None


@dataclass(frozen=True, slots=True)
class ExistingAutopilot:
    id: str
    config_version: int
    handle: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What the importer last computed for a row, and in which run (SPEC §8.7)."""

    row_hash: str | None
    row_id: int | None
    run_id: int | None


@dataclass(frozen=True, slots=True)
class RefusedValue:
    """The value of a row the database refused last (by row hash), and in which run."""

    row_hash: str
    run_id: int


@dataclass(frozen=True, slots=True)
class LegacyEvent:
    id: int
    thread_id: str
    run_id: str
    user_id: int
    type: str
    created_at: str | None
    payload: Any
    autopilot_id: str | None


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def timestamp_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)[:19]


def json_value(value: Any) -> Any:
    """A JSON column as read back: decoded on PostgreSQL, text on SQLite."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


class TargetView:
    """Batched reads of the destination database."""

    def __init__(self, engine: AsyncEngine, *, replace: bool = False, ledger: bool = True) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        self._emptied = frozenset(REPLACED_TABLES) if replace else frozenset()
        self._has_ledger = ledger  # False: a dry run against a database we never imported into

    async def _rows(self, stmts: Iterable[sa.Select[Any]]) -> list[sa.Row[Any]]:
        rows: list[sa.Row[Any]] = []
        async with self._engine.connect() as conn:
            for stmt in stmts:
                rows.extend((await conn.execute(stmt)).all())
        return rows

    async def users_by_workos(self, workos_ids: Sequence[str]) -> dict[str, ExistingUser]:
        u = TABLES["users"].c
        cols = (u.id, u.workos_id, u.name, u.email, u.avatar, u.handle)
        rows = await self._rows(
            sa.select(*cols).where(one_of(u.workos_id, chunk, self._dialect))
            for chunk in _chunks(workos_ids)
        )
        return {r.workos_id: ExistingUser(*r) for r in rows}

    async def email_owners(self, emails: Sequence[str]) -> dict[str, str]:
        """email → workos_id of the user that holds it (exact comparison, SPEC §8.5)."""
        u = TABLES["users"].c
        rows = await self._rows(
            sa.select(u.email, u.workos_id).where(one_of(u.email, chunk, self._dialect))
            for chunk in _chunks(emails)
        )
        return {r.email: r.workos_id for r in rows}

    async def autopilots_by_owner(self, user_ids: Sequence[int]) -> dict[int, ExistingAutopilot]:
        """Each owner's earliest autopilot, soft-deleted ones included (reference §5.3)."""
        a = TABLES["autopilots"].c
        rows = await self._rows(
            sa.select(a.owner_user_id, a.id, a.config_version, a.handle)
            .where(one_of(a.owner_user_id, chunk, self._dialect))
            .order_by(a.owner_user_id, a.created_at, a.id)
            for chunk in _chunks(user_ids)
        )
        found: dict[int, ExistingAutopilot] = {}
        for owner, autopilot_id, version, handle in rows:
            found.setdefault(
                int(owner), ExistingAutopilot(autopilot_id, max(int(version or 1), 1), handle)
            )
        return found

    async def taken_handles(self, handles: Sequence[str]) -> set[str]:
        a = TABLES["autopilots"].c
        rows = await self._rows(
            sa.select(a.handle).where(one_of(a.handle, chunk, self._dialect))
            for chunk in _chunks(handles)
        )
        return {r.handle for r in rows}

    async def ledger(self, table: str, keys: Sequence[str]) -> dict[str, LedgerEntry]:
        """The last computed hash (and allocated id) of each row, by ledger key."""
        if table in self._emptied or not self._has_ledger:
            return {}
        rows = await self._rows(
            sa.select(ROWS.c.row_key, ROWS.c.row_hash, ROWS.c.row_id, ROWS.c.run_id).where(
                ROWS.c.dest_table == table, one_of(ROWS.c.row_key, chunk, self._dialect)
            )
            for chunk in _chunks(keys)
        )
        return {r.row_key: LedgerEntry(r.row_hash, r.row_id, r.run_id) for r in rows}

    async def refused_tables(self) -> set[str]:
        """The tables with a refused value on record (`refused`); none read as emptied, in a
        dry run without the ledger, or in a database whose refusals predate their row hashes
        (a dry run does not upgrade the schema)."""
        if not self._has_ledger:
            return set()
        async with self._engine.connect() as conn:
            columns = await conn.run_sync(
                lambda c: {x["name"] for x in sa.inspect(c).get_columns(REFUSALS.name)}
            )
            if "row_hash" not in columns:
                return set()
            found = await conn.execute(
                sa.select(REFUSALS.c.dest_table).where(REFUSALS.c.row_hash.is_not(None)).distinct()
            )
            return {t for (t,) in found.all()} - self._emptied

    async def refused(self, table: str, keys: Sequence[str]) -> dict[str, RefusedValue]:
        """The last refused value of each of these rows that has one, by ledger key."""
        if table in self._emptied or not self._has_ledger or not keys:
            return {}
        c = REFUSALS.c
        rows = await self._rows(
            sa.select(c.row_key, c.row_hash, c.run_id)
            .where(c.dest_table == table, one_of(c.row_key, chunk, self._dialect))
            .order_by(c.id)
            for chunk in _chunks(keys)
        )
        found: dict[str, RefusedValue] = {}
        for key, digest, run_id in rows:  # by id: the last refusal of a key wins
            if digest is None:
                found.pop(key, None)  # not a value, or recorded before the hashes were
            else:
                found[key] = RefusedValue(digest, int(run_id))
        return found

    async def untouched(self, tables: Sequence[str]) -> set[str]:
        """The tables that hold no row, no ledger entry and no refusal: a first import into them.

        Until the derivation ends, a lookup in such a table can only find rows of the run being
        derived, which are never settled (`Derivation.settled`): its lookups can be skipped.
        """
        found: set[str] = set()
        async with self._engine.connect() as conn:
            for name in tables:
                # In this order, each probe only when the ones before found nothing: a probe
                # of the ledger for a table it holds nothing of can read the whole ledger.
                probes = [sa.select(sa.literal(1)).select_from(TABLES[name]).limit(1)]
                probes.append(sa.select(sa.literal(1)).where(ROWS.c.dest_table == name).limit(1))
                if self._has_ledger:
                    probes.append(
                        sa.select(sa.literal(1)).where(REFUSALS.c.dest_table == name).limit(1)
                    )
                for probe in probes:
                    if await conn.scalar(probe) is not None:
                        break
                else:
                    found.add(name)
        return found

    async def existing(self, table: str, keys: Sequence[Any]) -> set[Any]:
        """Which of these primary keys have a row in the table now."""
        if table in self._emptied or not keys:
            return set()
        column = TABLES[table].c[primary_key(table)]
        rows = await self._rows(
            sa.select(column).where(one_of(column, chunk, self._dialect)) for chunk in _chunks(keys)
        )
        return {r[0] for r in rows}

    async def threads_of(self, table: str, keys: Sequence[str]) -> dict[str, str]:
        """The thread each of these rows of `table` (runs or messages) is in now."""
        if table in self._emptied or not keys:
            return {}
        t = TABLES[table].c
        key, thread = t[primary_key(table)], t["thread_id"]
        rows = await self._rows(
            sa.select(key, thread).where(one_of(key, chunk, self._dialect))
            for chunk in _chunks(keys)
        )
        return {str(k): str(th) for k, th in rows}

    async def legacy_events(
        self, run_ids: Sequence[str], *, unlinked_only: bool = False
    ) -> list[LegacyEvent]:
        """Receipt events (type legacy_receipt*) of these runs written by older importers:
        events this importer wrote itself (they are in its row ledger) are left out.
        `unlinked_only`: only those without an autopilot, which the backfill links."""
        if "run_events" in self._emptied or not run_ids:
            return []
        e = TABLES["run_events"].c
        conditions: list[sa.ColumnElement[bool]] = [e.type.like("legacy_receipt%")]
        if unlinked_only:
            conditions.append(e.autopilot_id.is_(None))
        if self._has_ledger:
            ours = sa.select(ROWS.c.row_id).where(
                ROWS.c.dest_table == "run_events", ROWS.c.row_id == e.id
            )
            conditions.append(~sa.exists(ours))
        rows = await self._rows(
            sa.select(
                e.id,
                e.thread_id,
                e.run_id,
                e.user_id,
                e.type,
                e.created_at,
                e.payload,
                e.autopilot_id,
            ).where(one_of(e.run_id, chunk, self._dialect), *conditions)
            for chunk in _chunks(run_ids)
        )
        return [
            LegacyEvent(
                id=int(r.id),
                thread_id=r.thread_id,
                run_id=r.run_id,
                user_id=int(r.user_id),
                type=r.type,
                created_at=timestamp_text(r.created_at),
                payload=json_value(r.payload) if r.payload is not None else None,
                autopilot_id=r.autopilot_id,
            )
            for r in rows
        ]


class UserIds(Protocol):
    """Laravel user ids for new users, fixed before their rows are written."""

    async def ids_for(self, workos_ids: Sequence[str]) -> dict[str, int]: ...


class SqlUserIds:
    """Reserves ids from the users sequence and remembers them in `khala_import_user_ids`.

    Reserving (rather than letting the insert pick) lets every row that refers to a new user be
    computed before the user's own row reaches the database, and a replay reuses the same id.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def ids_for(self, workos_ids: Sequence[str]) -> dict[str, int]:
        async with self._engine.begin() as conn:
            known = await _reserved(conn, workos_ids)
            missing = [w for w in dict.fromkeys(workos_ids) if w not in known]
            if missing:
                fresh = await _allocate(conn, len(missing))
                rows = [{"workos_id": w, "user_id": i} for w, i in zip(missing, fresh, strict=True)]
                await conn.execute(sa.insert(USER_IDS), rows)
                known.update(zip(missing, fresh, strict=True))
        return known


class MemoryUserIds:
    """Dry-run: reads earlier reservations, invents the rest in memory, writes nothing."""

    def __init__(self, engine: AsyncEngine, *, ledger: bool = True) -> None:
        self._engine = engine
        self._has_ledger = ledger
        self._invented: dict[str, int] = {}
        self._next: int | None = None

    async def ids_for(self, workos_ids: Sequence[str]) -> dict[str, int]:
        known: dict[str, int] = {}
        async with self._engine.connect() as conn:
            if self._has_ledger:
                known = await _reserved(conn, workos_ids)
            if self._next is None:
                self._next = await _max_user_id(conn, ledger=self._has_ledger) + 1
        for w in workos_ids:
            if w not in known:
                if w not in self._invented:
                    self._invented[w], self._next = self._next, self._next + 1
                known[w] = self._invented[w]
        return known


async def _reserved(conn: AsyncConnection, workos_ids: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(list(workos_ids)):
        result = await conn.execute(
            sa.select(USER_IDS.c.workos_id, USER_IDS.c.user_id).where(
                one_of(USER_IDS.c.workos_id, chunk, conn.dialect.name)
            )
        )
        found.update({w: int(i) for w, i in result.all()})
    return found


async def _max_user_id(conn: AsyncConnection, *, ledger: bool = True) -> int:
    users = TABLES["users"]
    top = await conn.scalar(sa.select(sa.func.coalesce(sa.func.max(users.c.id), 0)))
    reserved: int | None = 0
    if ledger:
        reserved = await conn.scalar(
            sa.select(sa.func.coalesce(sa.func.max(USER_IDS.c.user_id), 0))
        )
    return max(int(top or 0), int(reserved or 0))


async def _allocate(conn: AsyncConnection, count: int) -> list[int]:
    if conn.dialect.name == "postgresql":
        return await _allocate_from_sequence(conn, count)
    # SQLite: AUTOINCREMENT never reuses below sqlite_sequence, so moving it reserves the ids.
    seq = await conn.scalar(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'users'"))
    start = max(await _max_user_id(conn), int(seq or 0)) + 1
    ids = list(range(start, start + count))
    if seq is None:
        await conn.execute(
            sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('users', :s)"), {"s": ids[-1]}
        )
    else:
        await conn.execute(
            sa.text("UPDATE sqlite_sequence SET seq = :s WHERE name = 'users'"), {"s": ids[-1]}
        )
    return ids


async def _allocate_from_sequence(conn: AsyncConnection, count: int) -> list[int]:
    """The next `count` ids of the users sequence, taken so that a rollback gives them back.

    `nextval` is not transactional: a reservation interrupted before its commit (a crash, a
    database outage) would leave a gap, and the rerun would hand out other ids than an
    uninterrupted run. `ALTER SEQUENCE` is transactional and holds off every other session's
    `nextval` until the commit, so the Laravel application cannot take a reserved id meanwhile.
    It needs the sequence's owner; any other role falls back to `nextval` (gaps possible).
    """
    seq = str(await conn.scalar(sa.text("SELECT pg_get_serial_sequence('users', 'id')")))
    cache = await conn.scalar(
        sa.text("SELECT seqcache FROM pg_sequence WHERE seqrelid = CAST(:seq AS regclass)"),
        {"seq": seq},
    )
    try:
        async with conn.begin_nested():
            # Changes nothing; takes the lock that `nextval` waits for, before reading.
            await conn.execute(sa.text(f"ALTER SEQUENCE {seq} CACHE {int(cache)}"))
    except sa.exc.DBAPIError as exc:
        if sqlstate(exc) != _INSUFFICIENT_PRIVILEGE:
            raise
        logger.warning("not the owner of %s: user ids come from nextval", seq)
        result = await conn.execute(
            sa.text(f"SELECT nextval('{seq}') FROM generate_series(1, :n)"), {"n": count}
        )
        return [int(i) for (i,) in result.all()]
    last, called = (await conn.execute(sa.text(f"SELECT last_value, is_called FROM {seq}"))).one()
    start = max(int(last) + 1 if called else int(last), await _max_user_id(conn) + 1)
    await conn.execute(sa.text(f"ALTER SEQUENCE {seq} RESTART WITH {start + count}"))
    return list(range(start, start + count))
