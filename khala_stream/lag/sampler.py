"""The Kafka side of `lag`: sample committed and end offsets, keep a window, judge it.

Kafka keeps only a group's latest committed offset, so Burrow's window of recent commits is
rebuilt by sampling (time, committed offset, end offset) per partition every few seconds and
keeping, in memory, the last `window` samples and the samples of the last `window` commits seen
(`--watch` and the metrics exporter: `rules.SampleWindow`), or by taking a short burst of
samples before judging (a one-shot `lag`).

Lag in seconds is the age of the oldest unconsumed message: now minus the timestamp of the
record at the committed offset, read with a consumer that belongs to no group (so it never
disturbs the group it measures). Those timestamps are cached per offset: a record's timestamp
never changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from khala_stream.broker.clients import make_admin, make_consumer
from khala_stream.config import KafkaSettings
from khala_stream.contract import Topics
from khala_stream.lag.report import GroupLag, LagReport, PartitionLag
from khala_stream.lag.rules import (
    OffsetSample,
    SampleWindow,
    evaluate_group,
    evaluate_partition,
)

__all__ = [
    "LagSampler",
    "WatchedGroup",
    "prefix_groups",
    "snapshot",
]

logger = logging.getLogger(__name__)

_Key = tuple[str, str, int]  # group, topic, partition


@dataclass(frozen=True, slots=True)
class WatchedGroup:
    """A consumer group and the topics it is expected to read.

    Topics are listed so that a partition the group has never committed to still shows (with
    its whole content as lag); topics the group has committed to are always added.
    """

    name: str
    topics: tuple[str, ...] = ()


def prefix_groups(prefix: str, only: str | None = None) -> list[WatchedGroup]:
    """The groups this product makes under `prefix` (process, then sink), or just `only`.

    `only` may be a full group name or the short `process` / `sink`; any other name is
    watched on the topics it has committed offsets for.
    """
    topics = Topics(prefix)
    known = [
        WatchedGroup(topics.processor_group, tuple(topics.sources)),
        WatchedGroup(topics.sink_group, (topics.changes,)),
    ]
    if only is None:
        return known
    for group in known:
        if only in (group.name, group.name.rsplit(".", 1)[-1]):
            return [group]
    return [WatchedGroup(only)]


class LagSampler:
    """Samples the offsets of some consumer groups into per-partition windows.

    Use as an async context manager. `sample()` adds one sample per partition; `report()`
    judges the windows and reads the lag in seconds. Raises aiokafka's `KafkaError`s as they
    come: the caller decides whether to retry (watch, exporter) or fail (one-shot).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        groups: Sequence[WatchedGroup],
        *,
        window: int = 10,
        fetch_timeout_s: float = 3.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window < 1:
            raise ValueError("window must hold at least one sample")
        self._kafka = kafka
        self._groups = list(groups)
        self._window = window
        self._fetch_timeout = fetch_timeout_s
        self._clock = clock
        self._windows: dict[_Key, SampleWindow] = {}
        self._timestamps: dict[tuple[str, int, int], int | None] = {}
        self._admin: AIOKafkaAdminClient | None = None
        self._reader: AIOKafkaConsumer | None = None

    @property
    def groups(self) -> list[WatchedGroup]:
        return list(self._groups)

    async def __aenter__(self) -> Self:
        admin = make_admin(self._kafka)
        try:
            await admin.start()
        except BaseException:
            await admin.close()
            raise
        reader = make_consumer(
            self._kafka,
            group_id=None,
            enable_auto_commit=False,
            # One record per partition is all a timestamp needs.
            max_partition_fetch_bytes=64 << 10,
            fetch_max_bytes=1 << 20,
        )
        try:
            await reader.start()
        except BaseException:
            await reader.stop()
            await admin.close()
            raise
        self._admin, self._reader = admin, reader
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        admin, reader = self._admin, self._reader
        self._admin = self._reader = None
        try:
            if reader is not None:
                await reader.stop()
        finally:
            if admin is not None:
                await admin.close()

    def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._reader is None:
            raise RuntimeError("LagSampler is not started: use it as `async with`")
        return self._admin, self._reader

    async def sample(self) -> None:
        """Add one sample for every partition of every watched group."""
        admin, reader = self._clients()
        committed: dict[str, dict[TopicPartition, tuple[int, str | None]]] = {}
        wanted: dict[str, set[str]] = {}
        for group in self._groups:
            offsets = await admin.list_consumer_group_offsets(group.name)
            committed[group.name] = {
                tp: (meta.offset, meta.metadata or None)
                for tp, meta in offsets.items()
                if meta.offset >= 0  # -1: no offset stored for this partition
            }
            wanted[group.name] = set(group.topics) | {tp.topic for tp in committed[group.name]}
        partitions = await self._partitions(set().union(*wanted.values()) if wanted else set())
        tps = [TopicPartition(t, p) for t in sorted(partitions) for p in partitions[t]]
        ends = await reader.end_offsets(tps) if tps else {}
        starts = await reader.beginning_offsets(tps) if tps else {}
        at = self._clock()
        seen: set[_Key] = set()
        for group in self._groups:
            for tp in tps:
                if tp.topic not in wanted[group.name]:
                    continue
                offset, commit_id = committed[group.name].get(tp, (None, None))
                key = (group.name, tp.topic, tp.partition)
                seen.add(key)
                window = self._windows.setdefault(key, SampleWindow(self._window))
                window.add(
                    OffsetSample(
                        at=at,
                        committed=offset,
                        end=ends[tp],
                        start=starts[tp],
                        commit_id=commit_id,
                    )
                )
        for key in set(self._windows) - seen:
            del self._windows[key]  # the topic is gone: forget its history

    async def _partitions(self, topics: Iterable[str]) -> dict[str, list[int]]:
        names = sorted(topics)
        if not names:
            return {}
        admin, _ = self._clients()
        existing = set(await admin.list_topics())
        names = [n for n in names if n in existing]
        if not names:
            return {}
        found: dict[str, list[int]] = {}
        for described in await admin.describe_topics(names):
            if described.get("error_code", 0) == 0:
                found[described["topic"]] = sorted(p["partition"] for p in described["partitions"])
        return found

    async def report(self) -> LagReport:
        """Judge every window; read the age of the oldest unconsumed message where lagging."""
        now = self._clock()
        positions = {
            key: latest
            for key, window in self._windows.items()
            if (latest := window.latest) is not None and latest.lag > 0
        }
        ages = await self._ages({(k[1], k[2], s.position) for k, s in positions.items()}, now)
        groups: list[GroupLag] = []
        longest = 0
        for group in self._groups:
            keys = sorted(k for k in self._windows if k[0] == group.name)
            rows: list[PartitionLag] = []
            statuses = []
            for key in keys:
                window = self._windows[key]
                longest = max(longest, window.samples)
                judged = window.window()
                status = replace(evaluate_partition(judged), complete=window.complete)
                statuses.append(status)
                last = judged[-1]
                seconds = 0.0 if status.lag == 0 else ages.get((key[1], key[2], last.position))
                rows.append(
                    PartitionLag(
                        group=group.name,
                        topic=key[1],
                        partition=key[2],
                        committed=last.committed,
                        end=last.end,
                        lag=status.lag,
                        lag_seconds=seconds,
                        rate=status.rate,
                        time_to_drain=status.time_to_drain,
                        status=status.status,
                        rule=status.rule,
                        complete=status.complete,
                    )
                )
            rolled = evaluate_group(statuses)
            rate = (
                sum(r.rate or 0.0 for r in rows) if any(r.rate is not None for r in rows) else None
            )
            if rolled.total_lag == 0:
                drain: float | None = 0.0
            elif rate:
                drain = rolled.total_lag / rate
            else:
                drain = None
            groups.append(
                GroupLag(
                    group=group.name,
                    status=rolled.status,
                    severity=rolled.severity,
                    total_lag=rolled.total_lag,
                    max_lag_seconds=max((r.lag_seconds or 0.0 for r in rows), default=0.0),
                    rate=rate,
                    time_to_drain=drain,
                    complete=rolled.complete,
                    partitions=tuple(rows),
                )
            )
        return LagReport(taken_at=now, samples=longest, groups=tuple(groups))

    async def _ages(
        self, wanted: set[tuple[str, int, int]], now: float
    ) -> dict[tuple[str, int, int], float]:
        """Seconds since the record at each (topic, partition, offset) was written."""
        self._timestamps = {k: v for k, v in self._timestamps.items() if k in wanted}
        missing = {k for k in wanted if k not in self._timestamps}
        if missing:
            self._timestamps.update(await self._read_timestamps(missing))
        return {
            k: max(0.0, now - ts / 1000)
            for k in wanted
            if (ts := self._timestamps.get(k)) is not None and ts >= 0
        }

    async def _read_timestamps(
        self, wanted: set[tuple[str, int, int]]
    ) -> dict[tuple[str, int, int], int | None]:
        _, reader = self._clients()
        offsets = {TopicPartition(t, p): o for t, p, o in wanted}
        reader.assign(list(offsets))
        for tp, offset in offsets.items():
            reader.seek(tp, offset)
        found: dict[TopicPartition, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._fetch_timeout
        try:
            while len(found) < len(offsets) and (left := deadline - loop.time()) > 0:
                missing = [tp for tp in offsets if tp not in found]
                batch = await reader.getmany(*missing, timeout_ms=max(1, int(left * 1000)))
                for tp, records in batch.items():
                    # The first record at or after the offset: the offset itself may be a
                    # transaction marker or compacted away.
                    first = next((r for r in records if r.offset >= offsets[tp]), None)
                    if first is not None:
                        found[tp] = first.timestamp
        finally:
            reader.unsubscribe()  # no background fetching between samples
        if len(found) < len(offsets):
            logger.info("lag seconds unknown for %d partitions", len(offsets) - len(found))
        return {(tp.topic, tp.partition, o): found.get(tp) for tp, o in offsets.items()}


async def snapshot(
    kafka: KafkaSettings,
    groups: Sequence[WatchedGroup],
    *,
    samples: int = 5,
    interval_s: float = 1.0,
) -> LagReport:
    """A one-shot judgement: `samples` samples `interval_s` apart, then the report."""
    if samples < 1:
        raise ValueError("take at least one sample")
    async with LagSampler(kafka, groups, window=samples) as sampler:
        for i in range(samples):
            if i:
                await asyncio.sleep(interval_s)
            await sampler.sample()
        return await sampler.report()
