"""Consumer positions in the database: conditional, race-safe advances (exactly-once effect)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db import advance, load_offsets
from tests.contract.engine import run_on

GROUP, TOPIC = "khala.sink", "khala.changes"


def run(db_url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    return run_on(db_url, body, laravel=False)


def test_advance_is_conditional(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {}
            assert await advance(conn, GROUP, TOPIC, 0, 0, 10)  # creates the row
            assert await advance(conn, GROUP, TOPIC, 1, 5, 8)  # first read offset 5
            assert await advance(conn, GROUP, TOPIC, 0, 10, 20)
        async with engine.begin() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {0: 20, 1: 8}
            assert not await advance(conn, GROUP, TOPIC, 0, 10, 20)  # replayed batch
            assert not await advance(conn, GROUP, TOPIC, 0, 15, 25)  # overlaps applied part
            assert await advance(conn, GROUP, TOPIC, 0, 22, 30)  # gap (compaction, markers)
            assert await load_offsets(conn, GROUP, TOPIC) == {0: 30, 1: 8}
            assert await load_offsets(conn, "other-group", TOPIC) == {}
            assert await load_offsets(conn, GROUP, "other-topic") == {}
            with pytest.raises(ValueError):
                await advance(conn, GROUP, TOPIC, 0, 30, 29)

    run(db_url, body)


def test_advance_rolls_back_with_the_transaction(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            tx = await conn.begin()
            assert await advance(conn, GROUP, TOPIC, 0, 0, 10)
            await tx.rollback()
        async with engine.begin() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {}
            assert await advance(conn, GROUP, TOPIC, 0, 0, 10)

    run(db_url, body)


def test_two_workers_creating_the_same_position(db_url: str) -> None:
    """Both see no row; the second waits for the first, then sees its commit and loses."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.connect() as first, engine.connect() as second:
            tx1 = await first.begin()
            assert await advance(first, GROUP, TOPIC, 3, 0, 10)

            async def other() -> bool:
                async with second.begin():
                    return await advance(second, GROUP, TOPIC, 3, 0, 10)

            racing = asyncio.create_task(other())
            await asyncio.sleep(0.5)
            assert not racing.done()  # blocked on the first worker's uncommitted row
            await tx1.commit()
            assert await asyncio.wait_for(racing, 30) is False
        async with engine.connect() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {3: 10}

    run(db_url, body)
