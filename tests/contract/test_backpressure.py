"""Backpressure against the positions a consumer group stores in the database.

A producing stage waits while the group it feeds is more than `limit` messages behind, so
that the consumer's fetches stay small on a broker that ignores fetch byte limits; a group
that makes no progress is taken to be absent and no longer waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.backpressure import Backpressure
from khala_stream.db import advance
from tests.contract.engine import run_on

GROUP, TOPIC = "khala.process", "khala.messages"
T = TypeVar("T")


def run(db_url: str, body: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    return run_on(db_url, body, laravel=False)


async def _consume(engine: AsyncEngine, partition: int, start: int, end: int) -> None:
    async with engine.begin() as conn:
        assert await advance(conn, GROUP, TOPIC, partition, start, end)


def test_a_producer_waits_until_the_group_is_within_the_limit(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> tuple[list[str], bool]:
        await _consume(engine, 0, 0, 10)
        await _consume(engine, 1, 0, 10)
        events: list[str] = []
        pressure = Backpressure(engine, GROUP, limit=5, patience_s=30, poll_s=0.01)

        async def consumer() -> None:
            await asyncio.sleep(0.3)
            events.append("partition 0 caught up")
            await _consume(engine, 0, 10, 20)  # 0 + 12 behind: still waiting
            await asyncio.sleep(0.3)
            events.append("partition 1 within the limit")
            await _consume(engine, 1, 10, 27)  # 0 + 5 behind

        task = asyncio.create_task(consumer())
        await pressure.wait(TOPIC, {0: 20, 1: 32})  # 10 + 22 behind
        events.append("producer goes on")
        await task
        return events, pressure.gave_up

    events, gave_up = run(db_url, body)
    assert events == ["partition 0 caught up", "partition 1 within the limit", "producer goes on"]
    assert not gave_up


def test_a_group_within_the_limit_is_not_waited_for(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> bool:
        await _consume(engine, 0, 0, 95)
        pressure = Backpressure(engine, GROUP, limit=5, patience_s=0.2, poll_s=0.01)
        await pressure.wait(TOPIC, {0: 100})
        return pressure.gave_up  # had it waited, the group's standstill would have ended it

    assert run(db_url, body) is False


def test_a_group_that_makes_no_progress_is_no_longer_waited_for(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> tuple[bool, bool]:
        pressure = Backpressure(engine, GROUP, limit=5, patience_s=0.5, poll_s=0.01)
        await pressure.wait(TOPIC, {0: 100})  # no consumer at all: gives up after 0.5 s
        gave_up = pressure.gave_up
        await pressure.wait(TOPIC, {0: 200})  # and from then on does not wait
        return gave_up, pressure.gave_up

    assert run(db_url, body) == (True, True)
