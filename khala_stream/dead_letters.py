"""The dead-letter topic: publish what could not be imported, list it, read it back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, TopicPartition

from khala_stream.broker.clients import make_consumer
from khala_stream.config import KafkaSettings
from khala_stream.contract.dead_letters import DeadLetter, decode_dead_letter, encode_dead_letter
from khala_stream.runtime import end_offsets


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    partition: int
    offset: int
    letter: DeadLetter


async def publish_dead_letters(
    producer: AIOKafkaProducer, topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Send and wait for every acknowledgement: a dead letter is durable before work moves on."""
    futures = []
    for letter in letters:
        key = f"{letter.table}:{letter.location}".encode()
        futures.append(await producer.send(topic, encode_dead_letter(letter), key=key))
    await asyncio.gather(*futures)


async def read_dead_letters(kafka: KafkaSettings, topic: str) -> list[StoredDeadLetter]:
    """Every dead letter in the topic, from the beginning to the current end."""
    consumer = make_consumer(kafka, group_id=None, isolation_level="read_committed")
    try:
        await consumer.start()  # inside: a broker out of reach still closes the client
        ends = {
            TopicPartition(topic, p): o for p, o in (await end_offsets(consumer, topic)).items()
        }
        tps = sorted(ends, key=lambda tp: tp.partition)
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        found: list[StoredDeadLetter] = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    if r.value is not None:
                        found.append(
                            StoredDeadLetter(tp.partition, r.offset, decode_dead_letter(r.value))
                        )
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        return found
    finally:
        await consumer.stop()
