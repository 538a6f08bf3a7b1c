"""producers.batches against the broker: every record arrives once, in order per partition, every
version of a key in the same partition, over all partitions, and the reported end offsets are
the broker's."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from khala_stream.broker.clients import ensure_topics, make_consumer, make_producer
from khala_stream.config import KafkaSettings
from producers.batches import PartitionedBatches

PARTITIONS = 3
RECORDS = 3000


async def _scenario(bootstrap: str, topic: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, partitions=PARTITIONS)
    await ensure_topics(kafka, [topic])
    producer = make_producer(kafka)
    consumer = make_consumer(kafka, group_id=None)
    await producer.start()
    await consumer.start()
    try:
        batches = await PartitionedBatches.for_topic(producer, topic)
        sent: list[tuple[bytes, bytes]] = []
        for i in range(RECORDS):
            # Large values every so often: builders fill up and go out mid-stream; one record
            # is bigger than a whole batch.
            size = 2_000_000 if i == 1234 else 60_000 if i % 97 == 0 else 40
            # Each key three times: its versions must stay in one partition, in order.
            key, value = f"doc-{i % 1000}".encode(), str(i).encode().ljust(size, b".")
            await batches.add(key, value, [("khala-line", str(i).encode())])
            sent.append((key, value))
        ends = await batches.flush()
        assert await batches.flush() == {}

        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        assert ends == {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
        received: dict[int, list[tuple[bytes, bytes, bytes]]] = {p: [] for p in range(PARTITIONS)}
        async with asyncio.timeout(60):
            while sum(map(len, received.values())) < RECORDS:
                for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                    received[tp.partition] += [
                        (r.key or b"", r.value or b"", dict(r.headers)["khala-line"])
                        for r in records
                    ]
    finally:
        await consumer.stop()
        await producer.stop()

    partitions_of: dict[bytes, set[int]] = {}
    for p, rows in received.items():
        for key, _, _ in rows:
            partitions_of.setdefault(key, set()).add(p)
    assert all(len(found) == 1 for found in partitions_of.values())
    placed = {key: found.pop() for key, found in partitions_of.items()}
    assert len(set(placed.values())) == PARTITIONS
    for p, rows in received.items():
        expected = [(k, v) for k, v in sent if placed[k] == p]
        assert [(k, v) for k, v, _ in rows] == expected  # each once, in order
        assert all(v.rstrip(b".") == line for _, v, line in rows)


def test_batches_keep_keys_together_in_order_and_report_end_offsets(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, f"{topic_prefix}.batches"))
