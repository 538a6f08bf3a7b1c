"""The dead-letter topic: publish what could not be imported, list it, read it back."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition

from khala_stream import metrics
from khala_stream.broker.clients import MAX_MESSAGE_BYTES, make_consumer
from khala_stream.config import KafkaSettings
from khala_stream.contract.dead_letters import (
    DeadLetter,
    ReasonCode,
    Stage,
    decode_dead_letter,
    encode_dead_letter,
)
from khala_stream.runtime import end_offsets

logger = logging.getLogger(__name__)

# A letter holds its raw bytes in base64 (4/3 of their size): what it keeps of a record must
# leave the letter within the largest message the topics take.
_KEPT_BYTES = MAX_MESSAGE_BYTES // 2


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    partition: int
    offset: int
    letter: DeadLetter


def record_letter(
    stage: Stage,
    record: ConsumerRecord[bytes, bytes],
    code: ReasonCode,
    reason: str,
    *,
    table: str,
) -> DeadLetter:
    """A record its stage sets aside, with where it was read and its value's bytes (the
    first `_KEPT_BYTES` of a larger one, as the reason then says)."""
    raw = record.value or b""
    if len(raw) > _KEPT_BYTES:
        reason = f"{reason} (first {_KEPT_BYTES} of {len(raw)} bytes kept)"
        raw = raw[:_KEPT_BYTES]
    return DeadLetter(
        stage=stage,
        reason_code=code,
        reason=reason,
        raw=raw,
        table=table,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )


async def publish_dead_letters(
    producer: AIOKafkaProducer, topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Send and wait for every acknowledgement: a dead letter is durable before work moves on."""
    futures = []
    for letter in letters:
        key = f"{letter.table}:{letter.location}".encode()
        futures.append(await producer.send(topic, encode_dead_letter(letter), key=key))
    await asyncio.gather(*futures)


async def set_aside_records(
    producer: AIOKafkaProducer, topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Publish records a stage sets aside (`record_letter`), acknowledged before the caller
    moves its position past them; counted and logged by where they were read and why."""
    if not letters:
        return
    await publish_dead_letters(producer, topic, letters)
    for (stage, code), n in Counter((x.stage, x.reason_code) for x in letters).items():
        metrics.dead_letters(stage, code, n)
    for letter in letters:
        logger.warning("record set aside: %s: %s", letter.location, letter.reason)


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
