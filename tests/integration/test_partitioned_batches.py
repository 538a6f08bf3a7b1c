"""producers.batches against the broker: every record arrives once, in order per partition, in
the partition `AIOKafkaProducer.send` would have chosen for its key, and the reported end
offsets are the broker's."""

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
    await ensure_topics(kafka, [topic, f"{topic}.by-send"])
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
            key, value = f"doc-{i}".encode(), str(i).encode().ljust(size, b".")
            await batches.add(key, value, [("khala-line", str(i).encode())])
            sent.append((key, value))
        ends = await batches.flush()
        assert await batches.flush() == {}

        # The partition `send` picks for the same keys.
        by_send = {}
        for key, _ in sent[:200]:
            metadata = await producer.send_and_wait(f"{topic}.by-send", b"", key=key)
            by_send[key] = metadata.partition

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

    placed = {key: p for p, rows in received.items() for key, _, _ in rows}
    assert all(placed[key] == p for key, p in by_send.items())
    assert len({p for p in placed.values()}) == PARTITIONS
    for p, rows in received.items():
        expected = [(k, v) for k, v in sent if placed[k] == p]
        assert [(k, v) for k, v, _ in rows] == expected  # each once, in order
        assert all(line == k.removeprefix(b"doc-") for k, _, line in rows)


def test_batches_keep_keyed_placement_order_and_report_end_offsets(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    asyncio.run(_scenario(kafka_bootstrap, f"{topic_prefix}.batches"))
