"""The stage runtime: one runner owns a stage's clients and its loop, and the retries.

    poll -> decode -> apply (+ advance positions, one transaction) -> commit for lag -> trim

`StageRunner` runs that loop for a `Stage` (the processor and the sink plug in what they do
with a batch, and the work they do between batches). The database holds the truth about
consumer positions (they move in the same transaction as the data); Kafka's committed offsets
are written afterwards only so that lag can be watched.

Partitions are assigned by hand (every partition of the stage's topics), not by the consumer
group protocol: the positions live in the database and advance conditionally, so two workers
that read the same partition apply each batch once between them (the loser rolls back and
seeks to the stored position), and a worker that died holds nothing a restarted one needs. A
group member killed without leaving cannot block a restart, whatever the broker's session
timeout (noida-db, the embedded broker, never expires one). The price: extra workers of a
stage add availability, not throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.broker.clients import Trimmer, make_consumer, make_producer
from khala_stream.broker.errors import is_transient as broker_transient
from khala_stream.config import KafkaSettings
from khala_stream.db.errors import describe
from khala_stream.db.errors import is_transient as db_transient
from khala_stream.db.offsets import load_offsets, rewind
from khala_stream.errors import RuntimeFailure, TransientError

logger = logging.getLogger(__name__)
T = TypeVar("T")
D = TypeVar("D")


def retryable(exc: BaseException) -> bool:
    """Broker and database trouble passes (`broker.errors`, `db.errors`); anything else is a
    bug or bad data."""
    return isinstance(exc, TransientError) or broker_transient(exc) or db_transient(exc)


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
    set.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        max_records: int,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._consumer = consumer
        self._max_records = max_records
        self._stop = stop or asyncio.Event()
        self._idle_s = _IDLE_S[0]

    async def poll(self) -> Batch:
        consumer = self._consumer
        consumer.resume(*consumer.paused())
        batch: Batch = await consumer.getmany(
            timeout_ms=_FIRST_WAIT_MS, max_records=self._max_records
        )
        drained = [tp for tp in consumer.assignment() if await self._drained(tp)]
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


class Retries:
    """The one port through which a stage waits out its dependencies (`with_retries`)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s

    async def database(self, action: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(action, what="the database", deadline_s=self.deadline_s)

    async def broker(self, action: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(action, what="the broker", deadline_s=self.deadline_s)


@dataclass(frozen=True, slots=True)
class Waiting:
    """What is left of a stage's work that only another stage can do."""

    stage: str
    """The stage that must run next: `publish`, `process` or `sink`."""
    reason: str

    def line(self) -> str:
        if self.stage == "publish":
            return f"{self.reason}: publish the export (again) first"
        return f"{self.reason}: run `khala-stream {self.stage} --until-idle` next"


class NeedsStage(Exception):
    """Raised by a stage's work in `--until-idle` mode instead of waiting on another stage."""

    def __init__(self, waiting: Waiting) -> None:
        self.waiting = waiting
        super().__init__(waiting.line())


class Stopping(Exception):
    """Raised by a stage's long work (a derivation, a wait) when the runner was asked to stop:
    the work is abandoned (it is resumable) and the runner stops cleanly."""


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"  # connecting, positioning from the database
    RUNNING = "running"
    STOPPING = "stopping"  # closing the clients
    STOPPED = "stopped"
    FAILED = "failed"


class StageClients:
    """A stage's broker clients: a consumer of its topics (partitions assigned by hand), a
    producer, and a group-less consumer for end offsets. Made and closed by the runner."""

    def __init__(self, kafka: KafkaSettings, group: str) -> None:
        self._kafka = kafka
        self.consumer = make_consumer(kafka, group_id=group)
        self.producer = make_producer(kafka)
        self.probe = make_consumer(kafka, group_id=None)

    async def start(self) -> None:
        await self.consumer.start()
        await self.producer.start()
        await self.probe.start()

    async def renew_producer(self) -> None:
        """A new producer id (after the broker lost records an idempotent producer had
        acknowledged, its sequence numbers run ahead of the broker's and every send fails)."""
        with contextlib.suppress(KafkaError):
            await self.producer.stop()
        self.producer = make_producer(self._kafka)
        await self.producer.start()

    async def close(self) -> None:
        """Close every client, each even when another fails or the task is being cancelled."""
        for client in (self.probe, self.producer, self.consumer):
            try:
                await asyncio.shield(asyncio.wait_for(client.stop(), _CLOSE_S))
            except (Exception, asyncio.CancelledError) as exc:
                logger.info("closing %s: %r", type(client).__name__, exc)


_CLOSE_S = 10.0


class Stage(Protocol[D]):
    """What a stage plugs into `StageRunner`.

    `attach` hands the stage the clients the runner made (again after a reconnection).
    `decode` turns a polled batch into the stage's own values: the place where a record that
    cannot be read is dealt with. `apply` writes them and advances the group's positions in
    one database transaction, and returns the new positions, or None when another worker had
    applied that batch first (nothing written); `applied` follows a batch that was. `between`
    is the stage's other work, run after every poll: True while it did something, or has
    something of its own left to do. `waiting` says, once the stage is idle, what of the
    remaining work needs another stage.
    """

    @property
    def group(self) -> str: ...

    @property
    def topics(self) -> Sequence[str]: ...

    @property
    def batch_records(self) -> int: ...

    def attach(self, clients: StageClients) -> None: ...

    def decode(self, batch: Batch) -> D: ...

    async def apply(self, decoded: D, batch: Batch) -> dict[TopicPartition, int] | None: ...

    async def applied(self, decoded: D, batch: Batch, seconds: float) -> None: ...

    async def between(self, *, until_idle: bool) -> bool: ...

    async def waiting(self) -> Waiting | None: ...


class StageRunner(Generic[D]):
    """Owns a stage's clients and runs its loop until `stop` is set, or, `until_idle`, until
    nothing is left that this stage can do. `state` says where it is."""

    def __init__(
        self,
        stage: Stage[D],
        kafka: KafkaSettings,
        engine: AsyncEngine,
        retries: Retries,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._stage = stage
        self._kafka = kafka
        self._engine = engine
        self._retries = retries
        self._stop = stop or asyncio.Event()
        self.state = State.NEW
        self.clients: StageClients | None = None

    async def run(self, *, until_idle: bool = False) -> Waiting | None:
        """Run the loop; with `until_idle`, returns what is left for the other stage, if any
        (None: nothing), instead of waiting for it."""
        stage, retries = self._stage, self._retries
        trimmer = Trimmer(self._kafka)
        waiting: Waiting | None = None
        self.state = State.STARTING
        try:
            clients = await retries.broker(self._connect)
            poller = Poller(clients.consumer, stage.batch_records, self._stop)
            self.state = State.RUNNING
            while not self._stop.is_set():
                batch = await poller.poll()
                if batch:
                    await self._handle(batch, clients, trimmer)
                busy = await retries.database(lambda: stage.between(until_idle=until_idle))
                idle = until_idle and not batch and not busy
                if idle and await retries.broker(lambda: caught_up(clients.consumer)):
                    waiting = await retries.database(stage.waiting)
                    break
        except NeedsStage as needs:
            waiting = needs.waiting
        except Stopping:
            pass
        except Exception:
            self.state = State.FAILED
            raise
        finally:
            if self.state is not State.FAILED:
                self.state = State.STOPPING
            if self.clients is not None:
                await self.clients.close()
            if self.state is not State.FAILED:
                self.state = State.STOPPED
        await trimmer.consumed({}, now=True)  # stopped cleanly: what is applied, at once
        return waiting

    async def _connect(self) -> StageClients:
        """Fresh clients, started and positioned (a client whose start failed cannot start
        again: each attempt makes new ones and closes those of the failed attempt)."""
        if self.clients is not None:
            await self.clients.close()
        self.clients = StageClients(self._kafka, self._stage.group)
        await self.clients.start()
        consumer = self.clients.consumer
        await consumer.topics()  # metadata of every topic, for the partitions
        partitions = []
        for topic in self._stage.topics:
            found = consumer.partitions_for_topic(topic)
            if not found:
                raise TransientError(f"topic {topic} is not on the broker yet")
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await self._retries.database(
            lambda: seek_to_stored(consumer, self._engine, self._stage.group, partitions)
        )
        self._stage.attach(self.clients)
        return self.clients

    async def _handle(self, batch: Batch, clients: StageClients, trimmer: Trimmer) -> None:
        started = time.monotonic()
        decoded = self._stage.decode(batch)
        positions = await self._retries.database(lambda: self._stage.apply(decoded, batch))
        if positions is None:  # another worker applied it first: continue from where it is
            consumer = clients.consumer
            await self._retries.database(
                lambda: seek_to_stored(
                    consumer, self._engine, self._stage.group, consumer.assignment()
                )
            )
            return
        await commit_for_lag(clients.consumer, positions)
        await trimmer.consumed(positions)
        await self._stage.applied(decoded, batch, time.monotonic() - started)
