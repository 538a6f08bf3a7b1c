"""Every Prometheus metric of khala-stream, and the small functions the stages call (SPEC §6).

All metrics live in one registry (`REGISTRY`, with the process and platform collectors), which
`serve` exposes over HTTP when a stage runs with `--metrics-port`. Recording is cheap and safe
without a server: the values simply are not scraped.

Names follow the Prometheus conventions: the `khala_` prefix, base units in the name
(`_seconds`, `_messages`, `_records`), `_total` on counters (added by prometheus-client).
The lag gauges are filled by `khala_stream.lag` (which samples Kafka); this module only holds
them, so that it stays below the broker code in the layers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

__all__ = [
    "BATCH_RECORDS",
    "BATCH_SECONDS",
    "COMMITTED_OFFSET",
    "DEAD_LETTERS",
    "END_OFFSET",
    "GROUP_COMPLETE",
    "GROUP_LAG",
    "GROUP_MAX_LAG_SECONDS",
    "GROUP_STATUS",
    "LAG_MESSAGES",
    "LAG_SECONDS",
    "PARTITION_STATUS",
    "RECORDS_IN",
    "RECORDS_OUT",
    "REGISTRY",
    "SOURCE_BEHIND",
    "SOURCE_FRESHNESS",
    "SOURCE_NEWEST",
    "SOURCE_PUBLISHED",
    "SOURCE_REQUESTS",
    "STATUSES",
    "TIME_TO_DRAIN",
    "WORKOS_CACHE",
    "WORKOS_REQUESTS",
    "WORKOS_RETRIES",
    "MetricsServer",
    "Stage",
    "WorkosOutcome",
    "dead_letters",
    "forget_group",
    "forget_partition",
    "metric_names",
    "record_batch",
    "record_output",
    "serve",
    "set_group_lag",
    "set_partition_lag",
    "source_freshness",
    "source_position",
    "source_request",
    "workos_cache",
    "workos_request",
    "workos_retry",
]

logger = logging.getLogger(__name__)

Stage = Literal["publish", "process", "sink"]
WorkosOutcome = Literal["ok", "not_found", "retryable", "failed"]
"""ok: 200 with a user; not_found: 404 or no valid email; retryable: 429/5xx/timeout (an
attempt that will be retried or given up); failed: any other answer."""

STATUSES: Final = ("OK", "WARN", "STALL", "STOP", "REWIND")
"""The lag statuses (`khala_stream.lag.LagStatus`), one series each in the status gauges."""

REGISTRY: Final = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_RECORD_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000)
_SECOND_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# ------------------------------------------------------------------ a followed deployment
SOURCE_NEWEST: Final = Gauge(
    "khala_source_newest_change_timestamp_seconds",
    "Source time (`_ts`) of the newest change `follow` has read from the deployment.",
    registry=REGISTRY,
)
SOURCE_PUBLISHED: Final = Gauge(
    "khala_source_published_timestamp_seconds",
    "Source time of the newest change `follow` has published (acknowledged by the broker).",
    registry=REGISTRY,
)
SOURCE_BEHIND: Final = Gauge(
    "khala_source_behind_seconds",
    "How far `follow` is behind the deployment: newest change read minus newest published.",
    registry=REGISTRY,
)
SOURCE_FRESHNESS: Final = Histogram(
    "khala_source_freshness_seconds",
    "End-to-end freshness: from a change's source time to the sink's commit of the run holding"
    " it (the oldest change of each run; the wall clock against the source's clock).",
    buckets=(0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 900),
    registry=REGISTRY,
)
SOURCE_REQUESTS: Final = Counter(
    "khala_source_requests",
    "Requests `follow` sent to the deployment, by endpoint and outcome (ok, retried).",
    ["endpoint", "outcome"],
    registry=REGISTRY,
)

# ------------------------------------------------------------------ throughput, per stage
RECORDS_IN: Final = Counter(
    "khala_records_in",
    "Records a stage has read: export lines (publish), source documents (process), "
    "row changes (sink); by source or destination table.",
    ["stage", "table"],
    registry=REGISTRY,
)
RECORDS_OUT: Final = Counter(
    "khala_records_out",
    "Records a stage has written: messages published (publish), row changes emitted "
    "(process), rows applied to the database (sink); by table.",
    ["stage", "table"],
    registry=REGISTRY,
)
BATCH_RECORDS: Final = Histogram(
    "khala_batch_records",
    "Records per batch a stage handles.",
    ["stage"],
    buckets=_RECORD_BUCKETS,
    registry=REGISTRY,
)
BATCH_SECONDS: Final = Histogram(
    "khala_batch_duration_seconds",
    "Time to handle one batch, from its poll to its commit.",
    ["stage"],
    buckets=_SECOND_BUCKETS,
    registry=REGISTRY,
)
DEAD_LETTERS: Final = Counter(
    "khala_dead_letters",
    "Records set aside on the dead-letter topic, by stage and reason code.",
    ["stage", "reason"],
    registry=REGISTRY,
)

# ------------------------------------------------------------------ WorkOS
WORKOS_REQUESTS: Final = Counter(
    "khala_workos_requests",
    "HTTP requests sent to WorkOS, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
WORKOS_CACHE: Final = Counter(
    "khala_workos_cache_lookups",
    "WorkOS look-ups answered from the importer's cache (hit) or not (miss).",
    ["result"],
    registry=REGISTRY,
)
WORKOS_RETRIES: Final = Counter(
    "khala_workos_retries",
    "WorkOS requests retried after a 429, a 5xx or a timeout.",
    registry=REGISTRY,
)

# ------------------------------------------------------------------ consumer lag
_PARTITION: Final = ["group", "topic", "partition"]
COMMITTED_OFFSET: Final = Gauge(
    "khala_consumergroup_committed_offset",
    "The group's committed offset (the next record it will read).",
    _PARTITION,
    registry=REGISTRY,
)
END_OFFSET: Final = Gauge(
    "khala_consumergroup_end_offset",
    "The partition's end offset, as seen when the group's lag was sampled.",
    _PARTITION,
    registry=REGISTRY,
)
LAG_MESSAGES: Final = Gauge(
    "khala_consumergroup_lag_messages",
    "Messages between the group's committed offset and the end of the partition.",
    _PARTITION,
    registry=REGISTRY,
)
LAG_SECONDS: Final = Gauge(
    "khala_consumergroup_lag_seconds",
    "Age of the oldest message the group has not consumed (0 without lag).",
    _PARTITION,
    registry=REGISTRY,
)
TIME_TO_DRAIN: Final = Gauge(
    "khala_consumergroup_time_to_drain_seconds",
    "Seconds until the lag is consumed at the current rate (absent while the rate is 0).",
    _PARTITION,
    registry=REGISTRY,
)
PARTITION_STATUS: Final = Gauge(
    "khala_consumergroup_partition_status",
    "1 for the partition's current Burrow-style status (OK, WARN, STALL, STOP, REWIND), "
    "0 for the others.",
    [*_PARTITION, "status"],
    registry=REGISTRY,
)
GROUP_STATUS: Final = Gauge(
    "khala_consumergroup_status",
    "1 for the group's status (its worst partition's), 0 for the others.",
    ["group", "status"],
    registry=REGISTRY,
)
GROUP_LAG: Final = Gauge(
    "khala_consumergroup_total_lag_messages",
    "The group's lag summed over its partitions.",
    ["group"],
    registry=REGISTRY,
)
GROUP_MAX_LAG_SECONDS: Final = Gauge(
    "khala_consumergroup_max_lag_seconds",
    "The age of the oldest unconsumed message over the group's partitions.",
    ["group"],
    registry=REGISTRY,
)
GROUP_COMPLETE: Final = Gauge(
    "khala_consumergroup_complete_ratio",
    "Fraction of the group's partitions whose sample window is full (statuses are "
    "provisional below 1).",
    ["group"],
    registry=REGISTRY,
)
_PARTITION_GAUGES: Final = (COMMITTED_OFFSET, END_OFFSET, LAG_MESSAGES, LAG_SECONDS, TIME_TO_DRAIN)
_GROUP_GAUGES: Final = (GROUP_LAG, GROUP_MAX_LAG_SECONDS, GROUP_COMPLETE)


def metric_names() -> frozenset[str]:
    """The names of every sample khala-stream exposes (with `_total`, `_bucket`... suffixes)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.update({f"{family.name}_total", f"{family.name}_created"})
        elif family.type == "histogram":
            names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created"))
    return frozenset(names)


# ------------------------------------------------------------------ what the stages call
def record_batch(stage: Stage, records_by_table: Mapping[str, int], seconds: float) -> None:
    """One batch handled: its records in, by table; its size and its duration."""
    total = 0
    for table, n in records_by_table.items():
        if n:
            RECORDS_IN.labels(stage, table).inc(n)
            total += n
    BATCH_RECORDS.labels(stage).observe(total)
    BATCH_SECONDS.labels(stage).observe(max(0.0, seconds))


def record_output(stage: Stage, records_by_table: Mapping[str, int]) -> None:
    """Records a stage has written, by table."""
    for table, n in records_by_table.items():
        if n:
            RECORDS_OUT.labels(stage, table).inc(n)


def dead_letters(stage: Stage, reason: str, n: int = 1) -> None:
    if n:
        DEAD_LETTERS.labels(stage, reason).inc(n)


def workos_request(outcome: WorkosOutcome) -> None:
    WORKOS_REQUESTS.labels(outcome).inc()


def workos_cache(*, hits: int = 0, misses: int = 0) -> None:
    if hits:
        WORKOS_CACHE.labels("hit").inc(hits)
    if misses:
        WORKOS_CACHE.labels("miss").inc(misses)


def workos_retry() -> None:
    WORKOS_RETRIES.inc()


def set_partition_lag(
    group: str,
    topic: str,
    partition: int,
    *,
    committed: int | None,
    end: int,
    lag: int,
    lag_seconds: float | None,
    time_to_drain: float | None,
    status: str,
) -> None:
    """Called by the lag exporter after each sample of a partition."""
    labels = (group, topic, str(partition))
    if committed is None:
        _remove(COMMITTED_OFFSET, labels)
    else:
        COMMITTED_OFFSET.labels(*labels).set(committed)
    END_OFFSET.labels(*labels).set(end)
    LAG_MESSAGES.labels(*labels).set(lag)
    if lag_seconds is None:
        _remove(LAG_SECONDS, labels)
    else:
        LAG_SECONDS.labels(*labels).set(lag_seconds)
    if time_to_drain is None:
        _remove(TIME_TO_DRAIN, labels)
    else:
        TIME_TO_DRAIN.labels(*labels).set(time_to_drain)
    for state in STATUSES:
        PARTITION_STATUS.labels(*labels, state).set(1 if state == status else 0)


def set_group_lag(
    group: str, *, status: str, total_lag: int, max_lag_seconds: float, complete: float
) -> None:
    """Called by the lag exporter after each evaluation of a group."""
    for state in STATUSES:
        GROUP_STATUS.labels(group, state).set(1 if state == status else 0)
    GROUP_LAG.labels(group).set(total_lag)
    GROUP_MAX_LAG_SECONDS.labels(group).set(max_lag_seconds)
    GROUP_COMPLETE.labels(group).set(complete)


def forget_partition(group: str, topic: str, partition: int) -> None:
    """Drop a partition's series (it no longer exists, or the group left the topic)."""
    labels = (group, topic, str(partition))
    for gauge in _PARTITION_GAUGES:
        _remove(gauge, labels)
    for state in STATUSES:
        _remove(PARTITION_STATUS, (*labels, state))


def forget_group(group: str) -> None:
    for gauge in _GROUP_GAUGES:
        _remove(gauge, (group,))
    for state in STATUSES:
        _remove(GROUP_STATUS, (group, state))


def _remove(gauge: Gauge, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):  # never set: nothing to drop
        gauge.remove(*labels)


# ------------------------------------------------------------------ the HTTP endpoint
@dataclass(slots=True)
class MetricsServer:
    """prometheus-client's HTTP server, running in a daemon thread until `close`."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(port: int, *, host: str = "127.0.0.1") -> MetricsServer:
    """Serve `REGISTRY` at http://host:port/metrics. Port 0 picks a free port.

    Loopback by default: a container that must be scraped from outside passes its own address
    (or 0.0.0.0). Raises OSError when the port is taken.
    """
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_port)
    logger.info("metrics served on %s:%d", host, bound)
    return MetricsServer(host=host, port=bound, _server=server, _thread=thread)


_source_at: dict[str, float] = {"newest": 0.0, "published": 0.0}


def source_position(*, newest_ns: int | None = None, published_ns: int | None = None) -> None:
    """Record where `follow` stands: the newest change read, the newest published."""
    if newest_ns is not None:
        _source_at["newest"] = newest_ns / 1e9
        SOURCE_NEWEST.set(newest_ns / 1e9)
    if published_ns is not None:
        _source_at["published"] = published_ns / 1e9
        SOURCE_PUBLISHED.set(published_ns / 1e9)
    SOURCE_BEHIND.set(max(0.0, _source_at["newest"] - _source_at["published"]))


def source_freshness(seconds: float) -> None:
    SOURCE_FRESHNESS.observe(max(0.0, seconds))


def source_request(endpoint: str, outcome: Literal["ok", "retried"]) -> None:
    SOURCE_REQUESTS.labels(endpoint, outcome).inc()
