"""User id reservations on PostgreSQL: gap-free after an interruption, never shared with the app.

New users get ids before their rows exist (processors/lookups.SqlUserIds). A reservation cut
off before its commit must give its ids back, or a rerun after a crash or an outage would
number the users differently from an uninterrupted run (SPEC §4, crash-safe); and the Laravel
application's own inserts (`nextval`) must never receive an id reserved here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream.db import create_engine
from processors.lookups import SqlUserIds
from tests.contract.engine import run_on

NEXTVAL = sa.text("SELECT nextval(pg_get_serial_sequence('users', 'id'))")


def run(db_url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    return run_on(db_url, body)


async def _backend_waiting_on(conn: AsyncConnection, table: str) -> int:
    """The pid of the session blocked on a lock of `table`."""
    async with asyncio.timeout(30):
        while True:
            pid = await conn.scalar(
                sa.text(
                    "SELECT l.pid FROM pg_locks l WHERE NOT l.granted "
                    "AND l.relation = CAST(:t AS regclass) LIMIT 1"
                ),
                {"t": table},
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.05)


def test_a_reservation_cut_off_before_its_commit_leaves_no_gap(pg_url: str) -> None:
    async def body(engine: AsyncEngine) -> tuple[dict[str, int], dict[str, int], int]:
        ids = SqlUserIds(engine)
        async with engine.connect() as blocker:
            # Hold the ledger so that the reservation stops after taking its ids, before its
            # commit; then end its session the way an outage or a kill -9 would.
            await blocker.execute(sa.text("LOCK TABLE khala_import_user_ids IN SHARE MODE"))
            cut_off = asyncio.create_task(ids.ids_for(["w1", "w2", "w3"]))
            pid = await _backend_waiting_on(blocker, "khala_import_user_ids")
            async with engine.connect() as admin:
                await admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            with pytest.raises(sa.exc.DBAPIError):
                await cut_off
            await blocker.rollback()
        await engine.dispose()  # the pool may still hold the terminated connection
        rerun = await ids.ids_for(["w1", "w2", "w3"])
        again = await ids.ids_for(["w3", "w4"])
        async with engine.connect() as conn:
            app_id = int(await conn.scalar(NEXTVAL) or 0)
        return rerun, again, app_id

    rerun, again, app_id = run(pg_url, body)
    assert rerun == {"w1": 1, "w2": 2, "w3": 3}  # as if the cut-off reservation never ran
    assert again == {"w3": 3, "w4": 4}  # kept, and the next one follows on
    assert app_id == 5  # the application's next insert gets an id nobody holds


def test_the_application_waits_while_a_reservation_is_open(pg_url: str) -> None:
    async def body(engine: AsyncEngine) -> tuple[bool, dict[str, int], int]:
        ids = SqlUserIds(engine)
        async with engine.connect() as blocker:
            await blocker.execute(sa.text("LOCK TABLE khala_import_user_ids IN SHARE MODE"))
            reserving = asyncio.create_task(ids.ids_for(["w1", "w2"]))
            await _backend_waiting_on(blocker, "khala_import_user_ids")

            async def app_insert() -> int:
                async with engine.connect() as app:
                    return int(await app.scalar(NEXTVAL) or 0)

            app = asyncio.create_task(app_insert())
            await asyncio.sleep(0.5)
            app_waited = not app.done()
            await blocker.rollback()  # the reservation commits, then the application goes on
        return app_waited, await reserving, await app

    app_waited, reserved, app_id = run(pg_url, body)
    assert app_waited
    assert reserved == {"w1": 1, "w2": 2}
    assert app_id == 3


def test_ids_follow_rows_the_application_wrote_with_explicit_ids(pg_url: str) -> None:
    async def body(engine: AsyncEngine) -> dict[str, int]:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO users (id, name, email, workos_id, avatar) "
                    "VALUES (41, 'a', 'a@example.com', 'w0', '')"
                )
            )
        return await SqlUserIds(engine).ids_for(["w1"])

    assert run(pg_url, body) == {"w1": 42}


def test_a_role_that_does_not_own_the_sequence_still_gets_ids(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    role = f"khala_not_owner_{uuid.uuid4().hex[:8]}"
    url = make_url(pg_url)

    async def setup(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
            await conn.execute(sa.text(f"CREATE ROLE {role} LOGIN"))
            await conn.execute(sa.text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
            await conn.execute(sa.text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))

    async def as_role(_: AsyncEngine) -> dict[str, int]:
        engine = create_engine(url.set(username=role).render_as_string(hide_password=False))
        try:
            return await SqlUserIds(engine).ids_for(["w1", "w2"])
        finally:
            await engine.dispose()

    async def drop(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f"DROP OWNED BY {role}"))
            await conn.execute(sa.text(f"DROP ROLE {role}"))

    run(pg_url, setup)
    try:
        with caplog.at_level(logging.WARNING, logger="processors.lookups"):
            assert run(pg_url, as_role) == {"w1": 1, "w2": 2}
        assert "user ids come from nextval" in caplog.text
    finally:
        run(pg_url, drop)
