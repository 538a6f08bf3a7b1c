"""The stage runtime positions its consumer from the database, also while the database is down.

Partitions are assigned by hand (`runtime.StageRunner`) and then positioned where the database
says the group's work stopped: a database outage at that moment is waited out through the
runtime's retry port, and one past the deadline reaches the stage as a RuntimeFailure.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from khala_stream.broker.clients import ensure_topics, make_consumer, make_producer
from khala_stream.config import KafkaSettings
from khala_stream.db.engine import create_engine, init_db
from khala_stream.db.offsets import advance
from khala_stream.errors import RuntimeFailure
from khala_stream.runtime import Poller, Retries, seek_to_stored
from tests.fixtures.own_postgres import LocalPostgres

STORED = 3  # the group's position in the database; offsets 0-2 count as applied


async def _prepare(db_url: str, kafka: KafkaSettings, topic: str, group: str) -> None:
    engine = create_engine(db_url)
    try:
        await init_db(engine, laravel=False)
        async with engine.begin() as conn:
            assert await advance(conn, group, topic, 0, 0, STORED)
    finally:
        await engine.dispose()
    await ensure_topics(kafka, [topic])
    producer = make_producer(kafka)
    await producer.start()
    try:
        for i in range(6):
            await producer.send_and_wait(topic, f"m{i}".encode(), partition=0)
    finally:
        await producer.stop()


async def _first_offsets(poller: Poller, limit_s: float) -> list[int]:
    """What the stage's loop sees: the first records read."""
    async with asyncio.timeout(limit_s):
        while True:
            batch = await poller.poll()
            if batch:
                return [r.offset for records in batch.values() for r in records]


async def _start_after(own_pg: LocalPostgres, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await asyncio.to_thread(own_pg.start)


async def _scenario(
    own_pg: LocalPostgres,
    db_url: str,
    bootstrap: str,
    topic: str,
    *,
    down_s: float | None,
    deadline_s: float,
) -> list[int] | RuntimeFailure:
    """Position while the database is down; bring it back after `down_s` (None: never)."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap, partitions=1)
    group = f"{topic}-group"
    await _prepare(db_url, kafka, topic, group)
    own_pg.stop()
    engine = create_engine(db_url)
    consumer = make_consumer(kafka, group_id=group)
    await consumer.start()
    partitions = [TopicPartition(topic, 0)]
    consumer.assign(partitions)
    restart = asyncio.create_task(_start_after(own_pg, down_s)) if down_s is not None else None
    try:
        try:
            await Retries(deadline_s).database(
                lambda: seek_to_stored(consumer, engine, group, partitions)
            )
        except RuntimeFailure as exc:
            return exc
        return await _first_offsets(Poller(consumer, 100), 90)
    finally:
        if restart is not None:
            await restart
        await consumer.stop()
        await engine.dispose()


def test_positioning_during_a_database_outage_waits_for_the_stored_position(
    own_pg: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    got = asyncio.run(
        _scenario(
            own_pg,
            own_pg.create_database(),
            kafka_bootstrap,
            f"{topic_prefix}.stored",
            down_s=2.0,
            deadline_s=60,
        )
    )
    # From the stored position, not from the start of the partition (Kafka has no commit).
    assert got == [3, 4, 5]
    assert "waiting for the database" in caplog.text


def test_an_outage_past_the_deadline_while_positioning_reaches_the_stage(
    own_pg: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    got = asyncio.run(
        _scenario(
            own_pg,
            own_pg.create_database(),
            kafka_bootstrap,
            f"{topic_prefix}.stored",
            down_s=None,
            deadline_s=1.0,
        )
    )
    assert isinstance(got, RuntimeFailure), got
    assert "gave up waiting for the database" in str(got)
