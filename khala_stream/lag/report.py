"""What `lag` reports: per group and partition, the figures and the verdict (SPEC §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from khala_stream.lag.rules import LagStatus, Severity

__all__ = ["GroupLag", "LagReport", "PartitionLag"]


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int
    lag_seconds: float | None
    """Age of the oldest unconsumed message; 0 without lag; None if it could not be read."""
    rate: float | None
    time_to_drain: float | None
    status: LagStatus
    rule: str
    complete: float

    def to_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "end": self.end,
            "lag": self.lag,
            "lag_seconds": _round(self.lag_seconds),
            "rate_per_second": _round(self.rate),
            "time_to_drain_seconds": _round(self.time_to_drain),
            "status": self.status,
            "rule": self.rule,
            "complete": round(self.complete, 3),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupLag:
    group: str
    status: LagStatus
    severity: Severity
    total_lag: int
    max_lag_seconds: float
    rate: float | None
    """Messages per second the group consumed over the window, over all its partitions."""
    time_to_drain: float | None
    complete: float
    partitions: tuple[PartitionLag, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "status": self.status,
            "severity": self.severity,
            "total_lag": self.total_lag,
            "max_lag_seconds": _round(self.max_lag_seconds),
            "rate_per_second": _round(self.rate),
            "time_to_drain_seconds": _round(self.time_to_drain),
            "complete": round(self.complete, 3),
            "partitions": [p.to_json() for p in self.partitions],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LagReport:
    taken_at: float
    samples: int
    """Samples in the longest window judged."""
    groups: tuple[GroupLag, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": round(self.taken_at, 3),
            "samples": self.samples,
            "groups": [g.to_json() for g in self.groups],
        }

    def group(self, name: str) -> GroupLag:
        for g in self.groups:
            if g.group == name:
                return g
        raise KeyError(name)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
