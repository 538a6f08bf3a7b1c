"""The publisher's librdkafka producer against the broker: every message arrives once, with its
key, headers and value, on the partition aiokafka's producer would choose for its key, at the
offset its future reports; an unreachable broker fails `start`, an undeliverable message fails
its future when the delivery timeout ends."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from khala_stream.broker.clients import (
    ensure_topics,
    make_consumer,
    make_document_producer,
    make_producer,
)
from khala_stream.broker.local_broker import start_local_broker
from khala_stream.broker.rdkafka_producer import DeliveryError, RdKafkaProducer
from khala_stream.config import KafkaSettings
from khala_stream.errors import TransientError

PARTITIONS = 6
COUNT = 3000


async def _read_all(kafka: KafkaSettings, topic: str, wanted: int) -> list[object]:
    consumer = make_consumer(kafka, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[object] = []
        async with asyncio.timeout(60):
            while len(records) < wanted:
                batch = await consumer.getmany(timeout_ms=500)
                records += [r for rs in batch.values() for r in rs]
        return records
    finally:
        await consumer.stop()


async def _scenario(bootstrap: str, prefix: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, partitions=PARTITIONS)
    ours, theirs = f"{prefix}.rd", f"{prefix}.aio"
    await ensure_topics(kafka, [ours, theirs])
    producer = make_document_producer(kafka, deadline_s=60)
    reference = make_producer(kafka)
    await producer.start()
    await reference.start()
    try:
        futures = [
            await producer.send(
                ours,
                f"value-{i}".encode() * (i % 50 + 1),
                key=f"doc-{i}".encode(),
                headers=[("line", str(i).encode()), ("table", b"messages")],
            )
            for i in range(COUNT)
        ]
        delivered = await asyncio.gather(*futures)
        for i in range(0, COUNT, 7):
            await reference.send(theirs, b"x", key=f"doc-{i}".encode())
        await reference.flush()
    finally:
        await reference.stop()
        await producer.stop()

    records = await _read_all(kafka, ours, COUNT)
    assert len(records) == COUNT
    by_line = {}
    for r in records:
        headers = dict(r.headers)  # type: ignore[attr-defined]
        by_line[int(headers["line"])] = r
    assert sorted(by_line) == list(range(COUNT))  # each exactly once
    for i, r in by_line.items():
        assert r.key == f"doc-{i}".encode()  # type: ignore[attr-defined]
        assert r.value == f"value-{i}".encode() * (i % 50 + 1)  # type: ignore[attr-defined]
        assert dict(r.headers)["table"] == b"messages"  # type: ignore[attr-defined]
        where = delivered[i]
        assert (where.partition, where.offset) == (r.partition, r.offset)  # type: ignore[attr-defined]
    assert len(Counter(d.partition for d in delivered)) == PARTITIONS  # keys spread out
    # The same key lands on the same partition as with aiokafka's (Java's) partitioner.
    for r in await _read_all(kafka, theirs, len(range(0, COUNT, 7))):
        line = int(r.key.decode().removeprefix("doc-"))  # type: ignore[attr-defined]
        assert delivered[line].partition == r.partition  # type: ignore[attr-defined]


def test_messages_arrive_once_with_key_headers_and_partition(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, topic_prefix))


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_start_fails_when_no_broker_answers() -> None:
    kafka = KafkaSettings(bootstrap_servers=_closed_port())
    producer = RdKafkaProducer(
        make_document_producer(kafka, deadline_s=5)._config, start_timeout_s=1
    )
    started = time.monotonic()
    with pytest.raises(TransientError, match="Unable to bootstrap"):
        asyncio.run(producer.start())
    assert time.monotonic() - started < 30


def test_a_message_the_broker_never_takes_fails_after_the_deadline(tmp_path: Path) -> None:
    """The broker stops after `start`: the delivery timeout fails the future (it would
    otherwise wait for ever), and `stop` does not hang on it."""

    async def scenario() -> None:
        broker = start_local_broker(tmp_path / "broker")
        try:
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
            await ensure_topics(kafka, ["gone"])
            producer = make_document_producer(kafka, deadline_s=2)
            await producer.start()
        finally:
            broker.stop()
        try:
            future = await producer.send("gone", b"v", key=b"k")
            async with asyncio.timeout(30):
                with pytest.raises(DeliveryError):
                    await future
        finally:
            async with asyncio.timeout(30):
                await producer.stop()

    asyncio.run(scenario())
