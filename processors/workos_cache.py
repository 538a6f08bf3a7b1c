"""The WorkOS answer cache across runs (SPEC §3.5), and the look-up that goes through it.

What is cached: WorkOS's own word on a user, positive (a `WorkosUser`) or negative (404, or no
valid email; stored with `found = false`). What is not: a look-up that failed after its retries
(or met an unexpected status), so the next run asks again.

`SqlWorkosCache` keeps answers in the importer's table `khala_import_workos_cache`;
`MemoryWorkosCache` keeps them for one process only, which is what a dry-run uses (SPEC §8.9).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.expression import TableClause

from khala_stream import metrics
from khala_stream.db.queries import insert_for
from processors.workos import WorkosClient, WorkosUser

logger = logging.getLogger(__name__)

CACHE_TABLE_NAME = "khala_import_workos_cache"

# Lightweight description of the table, enough for the statements below. The DDL lives in
# khala_stream/db/importer_tables.py; this module does not depend on it.
WORKOS_CACHE = sa.table(
    CACHE_TABLE_NAME,
    sa.column("workos_id", sa.Text()),
    sa.column("found", sa.Boolean()),
    sa.column("email", sa.Text()),
    sa.column("name", sa.Text()),
    sa.column("avatar", sa.Text()),
    sa.column("fetched_at", sa.DateTime()),
)

# Well under SQLite's bound-parameter limit and PostgreSQL's 32767.
_CHUNK = 500
# Misses are looked up and stored in slices, so a 401 late in a long run keeps what came before.
_LOOKUP_SLICE = 256


class WorkosCache(Protocol):
    """Where WorkOS answers are kept between look-ups."""

    async def get_many(
        self, ids: Sequence[str], *, fetched_after: datetime | None = None
    ) -> dict[str, WorkosUser | None]:
        """The cached answers among `ids` (None = cached negative answer); ids not cached,
        or fetched before `fetched_after` (naive UTC), are absent."""
        ...

    async def put_many(self, answers: Mapping[str, WorkosUser | None]) -> None:
        """Store (or replace) these answers."""
        ...


def utc_now() -> datetime:
    """Naive UTC, the form `fetched_at` is stored in (a `timestamp` without time zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _as_naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


class MemoryWorkosCache:
    """Answers for the life of this object only: a dry-run writes no table (SPEC §8.9)."""

    def __init__(self) -> None:
        self._answers: dict[str, tuple[WorkosUser | None, datetime]] = {}

    async def get_many(
        self, ids: Sequence[str], *, fetched_after: datetime | None = None
    ) -> dict[str, WorkosUser | None]:
        cutoff = None if fetched_after is None else _as_naive_utc(fetched_after)
        found: dict[str, WorkosUser | None] = {}
        for workos_id in ids:
            entry = self._answers.get(workos_id)
            if entry is not None and (cutoff is None or entry[1] >= cutoff):
                found[workos_id] = entry[0]
        return found

    async def put_many(self, answers: Mapping[str, WorkosUser | None]) -> None:
        now = utc_now()
        for workos_id, user in answers.items():
            self._answers[workos_id] = (user, now)


class SqlWorkosCache:
    """Answers in `khala_import_workos_cache`, on PostgreSQL or SQLite (any other dialect
    gets a delete-then-insert in one transaction)."""

    def __init__(self, engine: AsyncEngine, *, table: TableClause = WORKOS_CACHE) -> None:
        self._engine = engine
        self._table = table

    async def get_many(
        self, ids: Sequence[str], *, fetched_after: datetime | None = None
    ) -> dict[str, WorkosUser | None]:
        t = self._table
        unique = list(dict.fromkeys(ids))
        found: dict[str, WorkosUser | None] = {}
        async with self._engine.connect() as conn:
            for start in range(0, len(unique), _CHUNK):
                query = sa.select(t.c.workos_id, t.c.found, t.c.email, t.c.name, t.c.avatar).where(
                    t.c.workos_id.in_(unique[start : start + _CHUNK])
                )
                if fetched_after is not None:
                    query = query.where(t.c.fetched_at >= _as_naive_utc(fetched_after))
                for row in await conn.execute(query):
                    found[row.workos_id] = (
                        WorkosUser(email=row.email, name=row.name, avatar=row.avatar)
                        if row.found
                        else None
                    )
        return found

    async def put_many(self, answers: Mapping[str, WorkosUser | None]) -> None:
        if not answers:
            return
        now = utc_now()
        rows = [_row(workos_id, user, now) for workos_id, user in answers.items()]
        async with self._engine.begin() as conn:
            for start in range(0, len(rows), _CHUNK):
                await self._upsert(conn, rows[start : start + _CHUNK])

    async def _upsert(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
        t = self._table
        dialect = conn.dialect.name
        if dialect in ("postgresql", "sqlite"):
            insert = insert_for(conn, t)
            statement = insert.on_conflict_do_update(
                index_elements=[t.c.workos_id],
                set_={
                    name: insert.excluded[name]
                    for name in ("found", "email", "name", "avatar", "fetched_at")
                },
            )
            await conn.execute(statement, rows)
            return
        await conn.execute(sa.delete(t).where(t.c.workos_id.in_([r["workos_id"] for r in rows])))
        await conn.execute(sa.insert(t), rows)


def _row(workos_id: str, user: WorkosUser | None, now: datetime) -> dict[str, Any]:
    return {
        "workos_id": workos_id,
        "found": user is not None,
        "email": None if user is None else user.email,
        "name": None if user is None else user.name,
        "avatar": None if user is None else user.avatar,
        "fetched_at": now,
    }


async def resolve_with_cache(
    client: WorkosClient,
    cache: WorkosCache,
    ids: Sequence[str],
    *,
    ttl_seconds: float | None = None,
) -> tuple[dict[str, WorkosUser | None], int]:
    """Answer every id, from the cache where it can, else from WorkOS (then cached).

    Returns the answers (keyed by every distinct id) and how many came from the cache.
    `ttl_seconds=None` trusts cached answers forever. Raises WorkosAuthError on a 401/403;
    the answers of earlier slices are already stored then, so a rerun resumes cheaply.
    """
    unique = list(dict.fromkeys(ids))
    fetched_after = None if ttl_seconds is None else utc_now() - timedelta(seconds=ttl_seconds)
    answers = await cache.get_many(unique, fetched_after=fetched_after)
    from_cache = len(answers)
    client.note_cache_hits(from_cache)
    misses = [workos_id for workos_id in unique if workos_id not in answers]
    metrics.workos_cache(hits=from_cache, misses=len(misses))
    for start in range(0, len(misses), _LOOKUP_SLICE):
        results = await client.lookup_many(misses[start : start + _LOOKUP_SLICE])
        await cache.put_many(
            {workos_id: r.user for workos_id, r in results.items() if not r.failed}
        )
        answers.update((workos_id, r.user) for workos_id, r in results.items())
    logger.info(
        "WorkOS answers: ids=%d from_cache=%d looked_up=%d", len(unique), from_cache, len(misses)
    )
    return {workos_id: answers[workos_id] for workos_id in unique}, from_cache
