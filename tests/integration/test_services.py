"""Proof that the service fixtures are real: a Kafka-protocol broker and PostgreSQL servers."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.fixtures.services import cli_env

PARTITIONS = 3
KEYS = [f"user-{i}" for i in range(6)]
MESSAGES = [(KEYS[i % len(KEYS)], f"event-{i}") for i in range(30)]


async def _kafka_roundtrip(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    produced: dict[int, list[tuple[str, str]]] = defaultdict(list)
    try:
        for key, value in MESSAGES:
            meta = await producer.send_and_wait(topic, value.encode(), key=key.encode())
            produced[meta.partition].append((key, value))
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    consumed: dict[int, list[tuple[str, str]]] = defaultdict(list)
    try:
        async with asyncio.timeout(60):
            while sum(len(v) for v in consumed.values()) < len(MESSAGES):
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, records in batches.items():
                    for record in records:
                        assert record.key is not None and record.value is not None
                        consumed[tp.partition].append((record.key.decode(), record.value.decode()))
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        end_offsets = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()

    # Per-partition order is preserved, and a key always lands in one partition.
    assert consumed == produced
    key_partitions = {key: p for p, items in produced.items() for key, _ in items}
    for p, items in produced.items():
        assert all(key_partitions[key] == p for key, _ in items)
    assert len(produced) > 1, "6 keys over 3 partitions should use more than one partition"
    assert {tp.partition: offset for tp, offset in end_offsets.items()} == {
        p: len(produced.get(p, [])) for p in range(PARTITIONS)
    }


@pytest.mark.kafka
def test_kafka_produce_consume_keyed_messages(kafka_bootstrap: str, topic_prefix: str) -> None:
    asyncio.run(_kafka_roundtrip(kafka_bootstrap, f"{topic_prefix}.roundtrip"))


def test_topic_prefix_is_fresh_per_test(topic_prefix: str) -> None:
    assert topic_prefix.startswith("t_") and len(topic_prefix) == 10


async def _scalar(url: str, sql: str) -> object:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar_one()
    finally:
        await engine.dispose()


@pytest.mark.postgres
def test_pg_url_is_postgresql(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+asyncpg://")
    version = asyncio.run(_scalar(pg_url, "SELECT version()"))
    assert isinstance(version, str) and version.startswith("PostgreSQL"), version
    assert asyncio.run(_scalar(pg_url, "SELECT current_database()")) == make_url(pg_url).database


_seen_databases: list[str] = []


async def _fresh_database_check(pg_url: str, admin_url: str) -> str:
    engine = create_async_engine(pg_url)
    try:
        async with engine.begin() as conn:
            name = (await conn.execute(text("SELECT current_database()"))).scalar_one()
            tables = (
                await conn.execute(
                    text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalar_one()
            assert tables == 0, "each test must get an empty database"
            await conn.execute(text("CREATE TABLE marker (id int PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO marker VALUES (1)"))
    finally:
        await engine.dispose()

    admin = create_async_engine(make_url(admin_url).set(drivername="postgresql+asyncpg"))
    try:
        async with admin.connect() as conn:
            existing = set((await conn.execute(text("SELECT datname FROM pg_database"))).scalars())
    finally:
        await admin.dispose()
    assert name in existing
    # The previous test's database was dropped at its teardown.
    assert not existing.intersection(_seen_databases)
    return str(name)


@pytest.mark.postgres
@pytest.mark.parametrize("run", [1, 2])
def test_pg_url_databases_are_distinct(pg_url: str, pg_admin_url: str, run: int) -> None:
    name = asyncio.run(_fresh_database_check(pg_url, pg_admin_url))
    assert name not in _seen_databases
    _seen_databases.append(name)


async def _db_roundtrip(url: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE item (id int PRIMARY KEY, name text)"))
            await conn.execute(text("INSERT INTO item VALUES (1, 'a'), (2, 'b')"))
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT name FROM item ORDER BY id"))
            return [str(name) for name in rows.scalars()]
    finally:
        await engine.dispose()


def test_db_url_roundtrip(db_url: str) -> None:
    assert asyncio.run(_db_roundtrip(db_url)) == ["a", "b"]


def test_cli_env(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    monkeypatch.setenv("WORKOS_API_KEY", "secret")
    monkeypatch.setenv("KHALA_TOPIC_PREFIX", "stale")
    env = cli_env("127.0.0.1:1", "t_12345678", sqlite_url)
    assert not any(key.startswith("WORKOS_") for key in env)
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "127.0.0.1:1"
    assert env["KHALA_TOPIC_PREFIX"] == "t_12345678"
    assert env["DATABASE_URL"] == sqlite_url
    assert "PATH" in env
