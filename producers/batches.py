"""Keyed records sent to one topic a batch per partition, not a `send` per record.

`AIOKafkaProducer.send` pays, for every record, a future, a partitioner call through the
cluster metadata and an accumulator lookup: a third of the publisher's CPU for an export of
small documents. Here records are appended straight to a `BatchBuilder` per partition and a
full builder is submitted with `send_batch`.

A key always lands in the same partition: its crc32 picks one. Kafka's default partitioner
(murmur2) is pure Python in aiokafka and cost a sixth of the publisher's CPU; the placement
itself only spreads the load, since the store keeps the newest version of a document whatever
order versions arrive in (SPEC §4).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer

Headers = Sequence[tuple[str, bytes]]


class PartitionedBatches:
    """Collects records for `topic`; `flush` sends what is left and waits for every
    acknowledgement."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: Sequence[int]) -> None:
        self._producer = producer
        self._topic = topic
        self._partitions = sorted(partitions)
        self._open: dict[int, Any] = {}  # partition -> aiokafka BatchBuilder being filled
        self._sent: list[tuple[asyncio.Future[Any], int]] = []  # (acknowledgement, records)

    @classmethod
    async def for_topic(cls, producer: AIOKafkaProducer, topic: str) -> PartitionedBatches:
        return cls(producer, topic, list(await producer.partitions_for(topic)))

    def partition_of(self, key: bytes) -> int:
        return self._partitions[zlib.crc32(key) % len(self._partitions)]

    async def add(self, key: bytes, value: bytes, headers: Headers) -> None:
        partition = self.partition_of(key)
        builder = self._open.get(partition)
        if builder is None:
            builder = self._open[partition] = self._producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
            await self._submit(partition, builder)  # full: send it, start the next one
            builder = self._open[partition] = self._producer.create_batch()
            # An empty builder takes any one record, however large (the broker decides).
            builder.append(key=key, value=value, timestamp=None, headers=headers)

    async def _submit(self, partition: int, builder: Any) -> None:
        future = await self._producer.send_batch(builder, self._topic, partition=partition)
        self._sent.append((future, builder.record_count()))

    async def flush(self) -> dict[int, int]:
        """Send the open batches, wait for all acknowledgements; the end offset reached per
        partition (an empty dict when nothing was sent)."""
        for partition, builder in self._open.items():
            if builder.record_count():
                await self._submit(partition, builder)
        self._open = {}
        sent, self._sent = self._sent, []
        ends: dict[int, int] = {}
        for metadata, (_, count) in zip(
            await asyncio.gather(*(f for f, _ in sent)), sent, strict=True
        ):
            end = metadata.offset + count
            ends[metadata.partition] = max(ends.get(metadata.partition, 0), end)
        return ends
