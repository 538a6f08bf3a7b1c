"""aiokafka clients built from KafkaSettings: every client gets the same security settings."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from khala_stream.config import KafkaSettings, Settings
from khala_stream.errors import UsageError

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20
"""The largest message this product sends; its topics are created to accept it."""


def connection_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """The connection and security part of every client's configuration (SPEC §2)."""
    if kafka.bootstrap_servers is None:
        raise ValueError("no bootstrap servers: start the embedded broker first")
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = create_ssl_context(cafile=kafka.ssl_cafile)
    if kafka.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism or "PLAIN"
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = (
            kafka.sasl_password.reveal() if kafka.sasl_password else None
        )
    return kwargs


def make_producer(kafka: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """Idempotent producer, acks=all: a retried send never duplicates or reorders (SPEC §1)."""
    options: dict[str, Any] = {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 20,
        "max_batch_size": 1 << 20,
        "max_request_size": MAX_MESSAGE_BYTES,
        "request_timeout_ms": 60000,
        "compression_type": None if kafka.compression == "none" else kafka.compression,
    }
    options.update(overrides)
    return AIOKafkaProducer(**connection_kwargs(kafka), **options)


def make_consumer(
    kafka: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": 8 << 20,
        "fetch_max_bytes": 32 << 20,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **connection_kwargs(kafka), **options)


def make_admin(kafka: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection_kwargs(kafka))


class Trimmer:
    """Deletes the records before positions the database holds (`KafkaSettings.trim_consumed`).

    Called with a stage's stored positions after each batch; sends a DeleteRecords at most
    every `every_s` seconds, for the highest positions seen since the last one. Every second:
    the embedded broker's periodic snapshots cost CPU in proportion to what it still holds (at
    1M documents its CPU went from 42 s with a trim every 10 s to 9 s).
    """

    def __init__(self, kafka: KafkaSettings, every_s: float = 1.0) -> None:
        self._kafka = kafka
        self._every_s = every_s
        self._pending: dict[TopicPartition, int] = {}
        self._last = time.monotonic()

    async def consumed(self, positions: dict[TopicPartition, int], *, now: bool = False) -> None:
        if not self._kafka.trim_consumed:
            return
        for tp, offset in positions.items():
            self._pending[tp] = max(offset, self._pending.get(tp, 0))
        if self._pending and (now or time.monotonic() - self._last >= self._every_s):
            await self._trim()

    async def _trim(self) -> None:
        pending, self._pending = self._pending, {}
        self._last = time.monotonic()
        admin = make_admin(self._kafka)
        try:
            await admin.start()
            await admin.delete_records(
                {tp: RecordsToDelete(before_offset=o) for tp, o in pending.items()},
                timeout_ms=30000,
            )
        except KafkaError as exc:  # the records stay; the next trim covers them
            logger.info("trimming consumed records skipped: %s", exc)
        finally:
            await admin.close()


async def ensure_topics(
    kafka: KafkaSettings, names: Sequence[str], *, compacted: Sequence[str] = ()
) -> None:
    """Create the topics that are missing, with the configured partition count.

    `compacted` topics keep the last record of each key for good instead of for the retention
    period; one that already exists with another cleanup policy (made by an older version,
    or by hand) is switched, or a warning says why it could not be.
    """
    admin = make_admin(kafka)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            topics = [
                NewTopic(n, kafka.partitions, 1, topic_configs=_topic_config(n in compacted))
                for n in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(topics)
        for name in compacted:
            if name in existing:
                await _ensure_compacted(admin, name)
    finally:
        await admin.close()


def _topic_config(compacted: bool) -> dict[str, str]:
    # Room for a multi-MB export line (and its dead letter): Kafka's default is 1 MB.
    config = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
    if compacted:
        config["cleanup.policy"] = "compact"
    return config


def _topic(name: str, configs: dict[str, Any] | None) -> ConfigResource:
    return ConfigResource(ConfigResourceType.TOPIC, name, configs)


async def _cleanup_policy(admin: AIOKafkaAdminClient, name: str) -> str | None:
    """The topic's `cleanup.policy` as the broker describes it; None if it does not say."""
    for response in await admin.describe_configs([_topic(name, {"cleanup.policy": None})]):
        for error, *_, entries in response.resources:
            if error == 0:
                return next((str(e[1]) for e in entries if e[0] == "cleanup.policy"), None)
    return None


async def _ensure_compacted(admin: AIOKafkaAdminClient, name: str) -> None:
    try:
        if await _cleanup_policy(admin, name) == "compact":
            return
        # AlterConfigs replaces the topic's whole configuration: what this product sets, all.
        altered = await admin.alter_configs([_topic(name, _topic_config(True))])
        refused = [
            message or f"error {error}"
            for response in altered
            for error, message, *_ in response.resources
            if error != 0
        ]
    except KafkaError as exc:
        refused = [str(exc)]
    if refused:
        logger.warning(
            "topic %s keeps its records only for its retention period: switching it to"
            " cleanup.policy=compact failed (%s); set that policy on it by hand",
            name,
            "; ".join(refused),
        )
    else:
        logger.info("topic %s switched to cleanup.policy=compact", name)


@contextlib.asynccontextmanager
async def broker_session(settings: Settings) -> AsyncIterator[Settings]:
    """Settings with a reachable broker: the configured one, or the embedded broker (SPEC §7).

    The embedded broker keeps its data under `settings.broker_home`, beside the default SQLite
    database, so that the consumer positions stored in the database stay meaningful. One broker
    runs per home, shared by the commands using it, and stops after the last (broker/keeper.py).
    """
    if settings.kafka.bootstrap_servers is not None:
        yield settings
        return
    from khala_stream.broker.keeper import shared_broker

    trim = settings.kafka.trim_consumed is not False  # on by default here (see KafkaSettings)
    home = Path(settings.broker_home) / "broker"
    try:
        home.mkdir(parents=True, exist_ok=True)
        usable = os.access(home, os.W_OK | os.X_OK)
    except OSError as exc:  # a file in the way, a folder that cannot be made
        raise UsageError(f"KHALA_BROKER_HOME {settings.broker_home}: {exc.strerror}") from exc
    if not usable:
        raise UsageError(f"KHALA_BROKER_HOME {settings.broker_home}: {home} is not writable")
    async with shared_broker(home, idle_s=settings.broker_idle_s) as bootstrap:
        yield settings.with_overrides(
            kafka=replace(settings.kafka, bootstrap_servers=bootstrap, trim_consumed=trim)
        )
