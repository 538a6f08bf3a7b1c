"""runtime.Poller against the broker: partitions read to their end are paused between polls
(so no fetch is sent for them), and nothing produced meanwhile is lost or reordered."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from khala_stream.broker.clients import ensure_topics, make_consumer, make_producer
from khala_stream.config import KafkaSettings
from khala_stream.runtime import Batch, Poller

PARTITIONS = 3


async def _poll_until(poller: Poller, wanted: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    async with asyncio.timeout(60):
        while len(got) < wanted:
            batch: Batch = await poller.poll()
            got += [(tp.partition, r.value or b"") for tp, rs in batch.items() for r in rs]
    return got


async def _scenario(bootstrap: str, topic: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, partitions=PARTITIONS)
    await ensure_topics(kafka, [topic])
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, topic, group_id=f"{topic}-group")
    await producer.start()
    await consumer.start()
    try:
        for i in range(6):
            await producer.send_and_wait(topic, f"first-{i}".encode(), partition=i % PARTITIONS)
        poller = Poller(consumer, max_records=100)
        first = await _poll_until(poller, 6)
        assert sorted(v for _, v in first) == [f"first-{i}".encode() for i in range(6)]
        # Every partition is read to its end: all are paused until the next poll.
        await poller.poll()
        everything = {TopicPartition(topic, p) for p in range(PARTITIONS)}
        assert consumer.assignment() == everything
        assert consumer.paused() == everything

        # Produced while paused: the next polls resume and read it, in order per partition.
        for i in range(9):
            await producer.send_and_wait(topic, f"later-{i}".encode(), partition=i % PARTITIONS)
        later = await _poll_until(poller, 9)
        for p in range(PARTITIONS):
            in_partition = [v for part, v in later if part == p]
            assert in_partition == [f"later-{i}".encode() for i in range(p, 9, PARTITIONS)]
    finally:
        await consumer.stop()
        await producer.stop()


def test_poller_pauses_drained_partitions_and_loses_nothing(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, f"{topic_prefix}.poller"))
