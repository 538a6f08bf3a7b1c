"""Consumer lag (SPEC §6): Burrow's rules over sampled offsets, and the Kafka sampling.

`rules` is pure (a window of samples in, a status out); `sampler` talks to Kafka and builds a
`report`; `check` judges a report as a monitoring plugin (`lag --check`); `exporter` keeps the
Prometheus lag gauges current for a running stage.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from khala_stream.lag.check import (
        CHECK_EXIT_CODES,
        DEFAULT_CRIT_SECONDS,
        DEFAULT_WARN_SECONDS,
        CheckResult,
        CheckState,
        Thresholds,
        check_report,
        unknown,
    )
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
    "CHECK_EXIT_CODES",
    "DEFAULT_CRIT_SECONDS",
    "DEFAULT_WARN_SECONDS",
    "LAG_STATUSES",
    "CheckResult",
    "CheckState",
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
    "Thresholds",
    "WatchedGroup",
    "check_report",
    "commits_in",
    "consumption_rate",
    "evaluate_group",
    "evaluate_partition",
    "export_report",
    "lag_metrics",
    "prefix_groups",
    "shows_new_commit",
    "snapshot",
    "unknown",
]

# Where each name lives. Imported on first use (PEP 562), so that the CLI can build its parser
# from the pure modules (`check`, `rules`) without loading aiokafka for every command.
_HOME = {
    **dict.fromkeys(
        (
            "CHECK_EXIT_CODES",
            "DEFAULT_CRIT_SECONDS",
            "DEFAULT_WARN_SECONDS",
            "CheckResult",
            "CheckState",
            "Thresholds",
            "check_report",
            "unknown",
        ),
        "check",
    ),
    **dict.fromkeys(("export_report", "lag_metrics"), "exporter"),
    **dict.fromkeys(("GroupLag", "LagReport", "PartitionLag"), "report"),
    **dict.fromkeys(("LagSampler", "WatchedGroup", "prefix_groups", "snapshot"), "sampler"),
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module(f"khala_stream.lag.{_HOME.get(name, 'rules')}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
