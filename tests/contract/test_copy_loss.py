"""A COPY whose database connection is lost half way ends with an error the retries wait
out: asyncpg alone would wait for the dead socket to take more data for ever."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.errors import is_transient
from khala_stream.db.queries import copy_new_rows, copy_rows
from tests.contract.engine import run_on

_HANG_GUARD_S = 60.0  # far beyond the second the COPY takes before the loss


def _rows(started: asyncio.Event) -> Iterator[tuple[int, str]]:
    # Enough to fill the socket's buffers many times over: the COPY waits on the socket
    # (flow control) when its server goes away.
    for i in range(5_000_000):
        if i == 1000:
            started.set()
        yield i, "x" * 200


async def _copy_while_the_server_drops_it(engine: AsyncEngine, *, savepoint: bool) -> BaseException:
    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE copy_loss (id integer PRIMARY KEY, body text)"))
    started = asyncio.Event()
    hung = False
    try:
        async with engine.begin() as conn:
            backend = await conn.scalar(sa.text("SELECT pg_backend_pid()"))

            async def drop_it() -> None:
                await started.wait()
                await asyncio.sleep(0.2)
                async with engine.connect() as other:
                    await other.execute(sa.text(f"SELECT pg_terminate_backend({int(backend)})"))

            dropper = asyncio.ensure_future(drop_it())
            columns = ["id", "body"]
            copy = (
                copy_new_rows(conn, "copy_loss", columns, _rows(started))
                if savepoint
                else copy_rows(conn, "copy_loss", columns, _rows(started))
            )
            try:
                await asyncio.wait_for(copy, _HANG_GUARD_S)
            except TimeoutError:
                hung = True  # the transaction's rollback will raise on the dead connection
                raise
            await dropper
    except Exception as exc:
        assert not hung, "the COPY outlived its connection"
        return exc
    raise AssertionError("the COPY succeeded though its connection was dropped")


def test_a_copy_whose_connection_is_lost_fails_as_transient(pg_url: str) -> None:
    for savepoint in (False, True):
        error = run_on(
            pg_url,
            lambda engine, s=savepoint: _copy_while_the_server_drops_it(engine, savepoint=s),
            schema=False,
        )
        assert is_transient(error), repr(error)

        async def clean(engine: AsyncEngine) -> int:
            async with engine.begin() as conn:
                count = int(await conn.scalar(sa.text("SELECT count(*) FROM copy_loss")) or 0)
                await conn.execute(sa.text("DROP TABLE copy_loss"))
            return count

        assert run_on(pg_url, clean, schema=False) == 0  # the transaction went with the connection
