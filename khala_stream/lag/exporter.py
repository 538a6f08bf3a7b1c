"""Keeps the lag gauges of `khala_stream.metrics` current while a stage serves its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from aiokafka.errors import KafkaError

from khala_stream import metrics
from khala_stream.config import KafkaSettings
from khala_stream.lag.report import LagReport
from khala_stream.lag.sampler import LagSampler, WatchedGroup

__all__ = ["export_report", "lag_metrics"]

logger = logging.getLogger(__name__)


def export_report(report: LagReport, *, previous: LagReport | None = None) -> None:
    """Set the lag gauges from a report; drop the series of partitions no longer in it."""
    current = {(p.group, p.topic, p.partition) for g in report.groups for p in g.partitions}
    if previous is not None:
        for g in previous.groups:
            if all(g.group != h.group for h in report.groups):
                metrics.forget_group(g.group)
            for p in g.partitions:
                if (p.group, p.topic, p.partition) not in current:
                    metrics.forget_partition(p.group, p.topic, p.partition)
    for group in report.groups:
        for p in group.partitions:
            metrics.set_partition_lag(
                p.group,
                p.topic,
                p.partition,
                committed=p.committed,
                end=p.end,
                lag=p.lag,
                lag_seconds=p.lag_seconds,
                time_to_drain=p.time_to_drain,
                status=p.status,
            )
        metrics.set_group_lag(
            group.group,
            status=group.status,
            total_lag=group.total_lag,
            max_lag_seconds=group.max_lag_seconds,
            complete=group.complete,
        )


async def _export_forever(
    kafka: KafkaSettings, groups: Sequence[WatchedGroup], interval_s: float, window: int
) -> None:
    previous: LagReport | None = None
    while True:
        try:
            async with LagSampler(kafka, groups, window=window) as sampler:
                while True:
                    await sampler.sample()
                    report = await sampler.report()
                    export_report(report, previous=previous)
                    previous = report
                    await asyncio.sleep(interval_s)
        except Exception as exc:
            # Lag figures are an aid: no failure of theirs may stop the stage they run in.
            level = logging.WARNING if isinstance(exc, KafkaError | OSError) else logging.ERROR
            logger.log(level, "lag sampling failed, retrying in %.0fs: %r", interval_s, exc)
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def lag_metrics(
    kafka: KafkaSettings,
    groups: Sequence[WatchedGroup],
    *,
    interval_s: float = 5.0,
    window: int = 10,
) -> AsyncIterator[None]:
    """Sample `groups` every `interval_s` in a background task while the block runs."""
    if not groups:
        yield
        return
    task = asyncio.create_task(_export_forever(kafka, groups, interval_s, window))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
