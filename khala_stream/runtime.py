"""What the long-running stages share: consumers positioned from the database, and retries.

The database holds the truth about consumer positions (they move in the same transaction as
the data); Kafka's committed offsets are written afterwards only so that lag can be watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.errors import describe, is_transient
from khala_stream.db.offsets import load_offsets, rewind
from khala_stream.errors import RuntimeFailure, TransientError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def retryable(exc: BaseException) -> bool:
    """Broker and connection trouble passes; anything else is a bug or bad data."""
    return isinstance(exc, TransientError | KafkaError | ConnectionError | OSError) or is_transient(
        exc
    )


async def with_retries(
    action: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float = 300.0,
    base_s: float = 0.2,
    cap_s: float = 10.0,
) -> T:
    """Run `action`, retrying transient failures with capped exponential backoff and jitter.

    After `deadline_s` of failures it gives up with RuntimeFailure (exit 1); the work is
    resumable because nothing moves forward before it is committed.
    """
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return await action()
        except Exception as exc:
            if not retryable(exc):
                raise
            waited = time.monotonic() - started
            if waited >= deadline_s:
                raise RuntimeFailure(
                    f"gave up waiting for {what} after {waited:.0f}s: {describe(exc)}"
                ) from exc
            delay = min(random.uniform(0, min(cap_s, base_s * 2**attempt)), deadline_s - waited)
            attempt += 1
            logger.warning(
                "waiting for %s (attempt %d, retry in %.1fs): %s",
                what,
                attempt,
                delay,
                describe(exc),
            )
            await asyncio.sleep(delay)


async def seek_to_stored(
    consumer: AIOKafkaConsumer,
    engine: AsyncEngine,
    group: str,
    partitions: Iterable[TopicPartition],
) -> None:
    """Position each partition where the database says this group's work stopped."""
    partitions = list(partitions)
    if not partitions:
        return
    stored: dict[str, dict[int, int]] = {}
    async with engine.connect() as conn:
        for topic in {tp.topic for tp in partitions}:
            stored[topic] = await load_offsets(conn, group, topic)
    ends = await consumer.end_offsets(partitions)
    for tp in partitions:
        position = stored[tp.topic].get(tp.partition)
        if position is None:
            await consumer.seek_to_beginning(tp)
        elif position > ends[tp]:
            # The log is shorter than what this group has read: the topic is younger than the
            # database's memory of it (a new broker), or the broker lost acknowledged records.
            # Reading it again from the start is safe (applying is idempotent); the stored
            # position moves back with it, or the conditional advance would refuse every batch.
            start = (await consumer.beginning_offsets([tp]))[tp]
            logger.warning(
                "stored offset %d beyond end %d of %s; reading it again from %d",
                position,
                ends[tp],
                tp,
                start,
            )
            async with engine.begin() as conn:
                await rewind(conn, group, tp.topic, tp.partition, position, start)
            consumer.seek(tp, start)
        else:
            consumer.seek(tp, position)


class StoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """Re-positions from the database on every assignment (after a rebalance or a restart).

    aiokafka hands out an assignment before calling this listener, and its fetcher starts at
    the broker's idea of the position, so the new partitions are paused until they stand at
    the stored position (`seek` drops what was fetched from elsewhere). aiokafka also logs and
    swallows a listener's exception: a database that is down during a rebalance is waited out
    here, and a failure past the deadline is kept for the stage's loop (`Poller.poll` raises
    it) instead of being lost in the broker client's log.
    """

    def __init__(
        self, consumer: AIOKafkaConsumer, engine: AsyncEngine, group: str, *, deadline_s: float
    ) -> None:
        self._consumer = consumer
        self._engine = engine
        self._group = group
        self._deadline_s = deadline_s
        self._failure: BaseException | None = None
        self.positioning: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.positioning = set(assigned)
        self._consumer.pause(*assigned)  # before the first await: nothing is read too early
        try:
            await self._seek(assigned)
        except Exception as exc:  # raised in the stage's loop by check()
            self._failure = exc
            return  # stay paused: nothing may be read from an unknown position
        self.positioning = set()
        self._consumer.resume(*(assigned & self._consumer.assignment()))

    async def reposition(self) -> None:
        """Seek every assigned partition back to the stored position (another worker won)."""
        await self._seek(self._consumer.assignment())

    async def _seek(self, partitions: set[TopicPartition]) -> None:
        await with_retries(
            lambda: seek_to_stored(self._consumer, self._engine, self._group, partitions),
            what="the database",
            deadline_s=self._deadline_s,
        )

    def check(self) -> None:
        """Raise what went wrong while positioning the last assignment, if anything did."""
        if self._failure is not None:
            raise self._failure


Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
_FIRST_WAIT_MS = 20
_IDLE_S = (0.02, 0.2)  # pause between polls of an idle consumer: first, longest


class Poller:
    """`getmany` that does not keep the broker busy answering fetches for nothing.

    aiokafka prefetches in the background, sending the next fetch as soon as the last one
    returns, also while the caller is busy with a batch. A broker that answers a fetch at the
    end of a partition at once instead of holding it for `fetch.max.wait.ms` (noida-db, the
    embedded default) then spins with the consumer: 30-40% of a core each, for nothing. So a
    partition read to its end is paused until the next poll (no fetch is sent for a paused
    partition), and an idle consumer sleeps between polls, up to 0.2 s, or until `stop` is
    set. Partitions that `stored` is still positioning stay paused, and its failure is raised
    here.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        max_records: int,
        stored: StoredOffsets | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._consumer = consumer
        self._max_records = max_records
        self._stored = stored
        self._stop = stop or asyncio.Event()
        self._idle_s = _IDLE_S[0]

    async def poll(self) -> Batch:
        consumer = self._consumer
        held = self._stored.positioning if self._stored else set()
        consumer.resume(*(consumer.paused() - held))
        batch: Batch = await consumer.getmany(
            timeout_ms=_FIRST_WAIT_MS, max_records=self._max_records
        )
        if self._stored:
            self._stored.check()
            held = self._stored.positioning
        drained = [tp for tp in consumer.assignment() - held if await self._drained(tp)]
        consumer.pause(*(set(drained) & consumer.assignment()))  # a rebalance may have run
        if batch:
            self._idle_s = _IDLE_S[0]
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._idle_s)
            self._idle_s = min(self._idle_s * 2, _IDLE_S[1])
        return batch

    async def _drained(self, tp: TopicPartition) -> bool:
        end = self._consumer.highwater(tp)  # as of the last fetch; None before the first
        return end is not None and await self._consumer.position(tp) >= end


async def caught_up(consumer: AIOKafkaConsumer) -> bool:
    """True when every assigned partition has been read to its end."""
    assigned = consumer.assignment()
    if not assigned:
        return False
    ends = await consumer.end_offsets(list(assigned))
    for tp in assigned:
        if await consumer.position(tp) < ends[tp]:
            return False
    return True


async def commit_for_lag(consumer: AIOKafkaConsumer, positions: dict[TopicPartition, int]) -> None:
    """Mirror the database positions into Kafka, for `lag`; losing one is harmless."""
    if not positions:
        return
    try:
        await consumer.commit(positions)
    except KafkaError as exc:
        logger.info("offset commit for lag reporting skipped: %s", exc)


async def end_offsets(consumer: AIOKafkaConsumer, topic: str) -> dict[int, int]:
    """The current end offset of every partition of `topic` (group-less consumer)."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()  # a topic new to this client
        partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in partitions]
    ends = await consumer.end_offsets(tps) if tps else {}
    return {tp.partition: offset for tp, offset in ends.items()}
