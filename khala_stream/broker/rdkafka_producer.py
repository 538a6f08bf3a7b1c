"""The publisher's producer: librdkafka (confluent-kafka) behind aiokafka's `send` interface.

Publishing is one Kafka message per export line, and aiokafka's pure-Python producer spends
about 60 µs of the publishing process's only core on each (partitioner, record batches, zstd,
socket writes). librdkafka does that work in C on its own threads: the same 100k messages take
a tenth of the time (bench/README.md). confluent-kafka's own asyncio producer (`AIOProducer`)
refuses message headers, which carry every document's provenance, so this adapter drives the
plain `Producer` from the event loop: `produce` only queues, and delivery reports are served by
`poll(0)` on the loop's thread, where they resolve asyncio futures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import confluent_kafka

from khala_stream.errors import TransientError

_POLL_S = 0.005  # how often delivery reports are served while sends are outstanding
_IDLE_S = 0.05


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where a message landed (aiokafka's RecordMetadata has the same two fields)."""

    partition: int
    offset: int


class DeliveryError(TransientError):
    """The broker did not take a message before the delivery timeout."""


class RdKafkaProducer:
    """An idempotent producer with `start`, `send`, `send_and_wait`, `stop` like aiokafka's."""

    def __init__(self, config: dict[str, Any], *, start_timeout_s: float = 10.0) -> None:
        self._config = config
        self._start_timeout_s = start_timeout_s
        self._producer: confluent_kafka.Producer | None = None
        self._outstanding = 0
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        producer = confluent_kafka.Producer(self._config)
        # librdkafka connects lazily and retries for ever; ask for metadata so that an
        # unreachable broker fails here, as aiokafka's start does (and is retried by the caller).
        try:
            await asyncio.to_thread(producer.list_topics, timeout=self._start_timeout_s)
        except confluent_kafka.KafkaException as exc:
            raise TransientError(f"Unable to bootstrap from the brokers: {exc}") from exc
        self._producer = producer
        self._poller = asyncio.create_task(self._serve_reports())

    async def stop(self) -> None:
        if self._producer is None:
            return
        with contextlib.suppress(DeliveryError):
            await self.flush()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self._producer = None

    async def send(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Delivered]:
        """Queue a message; the future resolves when the broker has acknowledged it."""
        producer = self._require()
        future: asyncio.Future[Delivered] = asyncio.get_running_loop().create_future()

        def delivered(err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
            self._outstanding -= 1
            if future.done():
                return
            if err is not None:
                future.set_exception(DeliveryError(f"{topic}: {err.str()}"))
            else:
                future.set_result(Delivered(msg.partition() or 0, msg.offset() or 0))

        while True:
            try:
                producer.produce(
                    topic, value, key, headers=list(headers or ()), on_delivery=delivered
                )
                break
            except BufferError:  # librdkafka's queue is full: let deliveries drain it
                producer.poll(0)
                await asyncio.sleep(_POLL_S)
        self._outstanding += 1
        self._wake.set()
        return future

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Delivered:
        return await (await self.send(topic, value, key=key, headers=headers))

    async def flush(self) -> None:
        """Until every queued message is acknowledged (or has failed)."""
        producer = self._require()
        while self._outstanding > 0:
            producer.poll(0)
            await asyncio.sleep(_POLL_S)

    async def _serve_reports(self) -> None:
        producer = self._require()
        while True:
            producer.poll(0)
            if self._outstanding > 0:
                await asyncio.sleep(_POLL_S)
            else:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _IDLE_S)

    def _require(self) -> confluent_kafka.Producer:
        if self._producer is None:
            raise RuntimeError("producer not started")
        return self._producer
