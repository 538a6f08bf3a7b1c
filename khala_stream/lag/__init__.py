"""Consumer lag (SPEC §6): Burrow's rules over sampled offsets, and the Kafka sampling.

`rules` is pure (a window of samples in, a status out); `sampler` talks to Kafka and builds a
`report`; `exporter` keeps the Prometheus lag gauges current for a running stage.
"""

from khala_stream.lag.exporter import export_report, lag_metrics
from khala_stream.lag.report import GroupLag, LagReport, PartitionLag
from khala_stream.lag.rules import (
    LAG_STATUSES,
    Commit,
    GroupStatus,
    LagStatus,
    OffsetSample,
    PartitionStatus,
    SampleWindow,
    Severity,
    commits_in,
    consumption_rate,
    evaluate_group,
    evaluate_partition,
    shows_new_commit,
)
from khala_stream.lag.sampler import LagSampler, WatchedGroup, prefix_groups, snapshot

__all__ = [
    "LAG_STATUSES",
    "Commit",
    "GroupLag",
    "GroupStatus",
    "LagReport",
    "LagSampler",
    "LagStatus",
    "OffsetSample",
    "PartitionLag",
    "PartitionStatus",
    "SampleWindow",
    "Severity",
    "WatchedGroup",
    "commits_in",
    "consumption_rate",
    "evaluate_group",
    "evaluate_partition",
    "export_report",
    "lag_metrics",
    "prefix_groups",
    "shows_new_commit",
    "snapshot",
]
