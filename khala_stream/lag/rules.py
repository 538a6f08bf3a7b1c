"""Burrow's consumer-lag evaluation rules, as pure functions over a window of offset samples.

Burrow (LinkedIn, `core/internal/evaluator/caching.go`) judges a partition over a sliding
window of its recent commits, with no thresholds to tune. Kafka keeps only the latest committed
offset, so `lag` samples it: a window here is a list of `OffsetSample`s (time, committed
offset, end offset), oldest first, and the commits are what the samples show:

- the first sample's committed offset is the window's first commit, dated at that sample;
- every later sample whose offset (or commit metadata) differs from the previous one shows a
  new commit, dated at the sample that first saw it.

Rules, checked in this order only when the current lag is above zero (SPEC §6, anchors §3):

1. the lag was zero in any sample of the window            -> OK
2. the committed offset went backwards                      -> REWIND
3. now - last commit > last commit - first commit           -> STOP  (no longer committing)
4. two or more commits, all of the same offset              -> STALL (committing, not moving)
5. offsets move but the lag at the commits never decreases  -> WARN  (too slow)
otherwise OK. "now" is the time of the newest sample, so the functions stay pure.

A window with fewer than two samples cannot be judged: it is OK with `complete` below 1.
Offsets alone cannot show a commit that repeats an offset; a consumer that writes its commit
time into the commit metadata (`commit_id`) makes STALL visible, otherwise a consumer that
stops moving shows as STOP.

A long-running sampler keeps a `SampleWindow`: its last N samples plus the samples at which its
last N commits were first seen. Like Burrow's ring of N commits, the span of those commits
grows with the consumer's own commit interval, so rule 3 adapts to slow committers instead of
depending on the sampling interval; the recent samples play the part of Burrow's ring of broker
offsets for rule 1 (a consumer that was caught up a moment ago is not STOP).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final, Literal

__all__ = [
    "LAG_STATUSES",
    "Commit",
    "GroupStatus",
    "LagStatus",
    "OffsetSample",
    "PartitionStatus",
    "SampleWindow",
    "Severity",
    "commits_in",
    "consumption_rate",
    "evaluate_group",
    "evaluate_partition",
    "shows_new_commit",
]

LagStatus = Literal["OK", "WARN", "STALL", "STOP", "REWIND"]
Severity = Literal["OK", "WARN", "ERR"]
"""Burrow's group-level roll-up: STOP, STALL and REWIND all count as ERR."""

LAG_STATUSES: Final[tuple[LagStatus, ...]] = ("OK", "WARN", "STALL", "STOP", "REWIND")

# Burrow's StatusConstant order (OK < WARN < ERR < STOP < STALL < REWIND): a group takes the
# worst status among its partitions.
_RANK: Final[dict[LagStatus, int]] = {"OK": 0, "WARN": 1, "STOP": 3, "STALL": 4, "REWIND": 5}


@dataclass(frozen=True, slots=True, kw_only=True)
class OffsetSample:
    """One look at a partition: what the group had committed and where the log ended."""

    at: float
    """When the sample was taken, in seconds since the epoch."""
    committed: int | None
    """The group's committed offset (the next record it will read); None when it has none."""
    end: int
    """The partition's end offset (the offset the next record written will get)."""
    start: int = 0
    """The log start offset: where a group without a committed offset begins reading."""
    commit_id: str | None = None
    """The commit's metadata, when the consumer writes one: tells apart two commits of the
    same offset."""

    @property
    def position(self) -> int:
        return self.committed if self.committed is not None else self.start

    @property
    def lag(self) -> int:
        # A committed offset beyond the end (the topic was recreated) is not negative lag.
        return max(0, self.end - self.position)


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    at: float
    offset: int
    lag: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionStatus:
    status: LagStatus
    lag: int
    """Lag in messages at the newest sample."""
    rate: float | None
    """Messages consumed per second over the window; None with fewer than two samples."""
    time_to_drain: float | None
    """Seconds until the lag is consumed at `rate`; 0 without lag, None when `rate` is 0."""
    complete: float
    """How full the window is (1.0 when it holds as many samples as it can)."""
    commits: int
    """Commits seen in the window."""
    rule: str
    """Which rule decided the status, in words (for `--json` and for reading the output)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupStatus:
    status: LagStatus
    """The worst partition status, in Burrow's order."""
    severity: Severity
    total_lag: int
    complete: float
    """The fraction of partitions whose window is full."""
    partitions: int
    max_lag_index: int | None
    """Index (in the evaluated sequence) of the partition with the most lag; None if empty."""


def shows_new_commit(previous: OffsetSample | None, sample: OffsetSample) -> bool:
    """Whether `sample` shows a commit that `previous` (the sample before it) did not."""
    return previous is None or (
        sample.committed != previous.committed
        or (sample.commit_id is not None and sample.commit_id != previous.commit_id)
    )


def commits_in(window: Sequence[OffsetSample]) -> list[Commit]:
    """The commits the window shows, oldest first (see the module docstring)."""
    commits: list[Commit] = []
    previous: OffsetSample | None = None
    for sample in window:
        if shows_new_commit(previous, sample):
            commits.append(Commit(at=sample.at, offset=sample.position, lag=sample.lag))
        previous = sample
    return commits


class SampleWindow:
    """The window a long-running sampler keeps for one partition (see the module docstring).

    `window()` is what `evaluate_partition` judges; `complete` counts recent samples.
    """

    __slots__ = ("_capacity", "_commits", "_samples")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a window holds at least one sample")
        self._capacity = capacity
        self._samples: deque[OffsetSample] = deque(maxlen=capacity)
        self._commits: deque[OffsetSample] = deque(maxlen=capacity)

    def add(self, sample: OffsetSample) -> None:
        if self._samples and sample.at < self._samples[-1].at:
            raise ValueError("samples must be added oldest first")
        if shows_new_commit(self._samples[-1] if self._samples else None, sample):
            self._commits.append(sample)
        self._samples.append(sample)

    @property
    def latest(self) -> OffsetSample | None:
        return self._samples[-1] if self._samples else None

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def complete(self) -> float:
        return len(self._samples) / self._capacity

    def window(self) -> list[OffsetSample]:
        """The commit samples and the recent samples, merged oldest first."""
        # Each commit sample is one of the samples, so the N latest commit samples reach at
        # least as far back as the N latest samples: the merge starts with a commit sample.
        merged = {id(s): s for s in (*self._commits, *self._samples)}
        return sorted(merged.values(), key=lambda s: s.at)


def consumption_rate(window: Sequence[OffsetSample]) -> float | None:
    """Messages per second the group consumed over the window; None if it cannot be told."""
    if len(window) < 2:
        return None
    span = window[-1].at - window[0].at
    if span <= 0:
        return None
    return max(0.0, (window[-1].position - window[0].position) / span)


def evaluate_partition(
    window: Sequence[OffsetSample], *, intervals: int | None = None
) -> PartitionStatus:
    """Judge one partition over its window (oldest sample first).

    `intervals` is the window's capacity, for `complete`; None means the window is full.
    Pure: the same window always gives the same answer.
    """
    if not window:
        return PartitionStatus(
            status="OK",
            lag=0,
            rate=None,
            time_to_drain=None,
            complete=0.0,
            commits=0,
            rule="no samples",
        )
    capacity = intervals if intervals is not None else len(window)
    complete = min(1.0, len(window) / capacity) if capacity > 0 else 1.0
    lag = window[-1].lag
    rate = consumption_rate(window)
    if lag == 0:
        drain: float | None = 0.0
    elif rate:
        drain = lag / rate
    else:
        drain = None
    commits = commits_in(window)
    status, rule = _judge(window, commits, lag)
    return PartitionStatus(
        status=status,
        lag=lag,
        rate=rate,
        time_to_drain=drain,
        complete=complete,
        commits=len(commits),
        rule=rule,
    )


def _judge(
    window: Sequence[OffsetSample], commits: Sequence[Commit], lag: int
) -> tuple[LagStatus, str]:
    if lag == 0:
        return "OK", "no lag"
    if len(window) < 2:
        return "OK", "too few samples to judge"
    # Rule 1: a consumer that caught up at any point in the window is keeping up.
    if any(sample.lag == 0 for sample in window):
        return "OK", "lag was zero within the window"
    # Rule 2: the committed offset went backwards (a reset, or a consumer replaying).
    if any(later.offset < earlier.offset for earlier, later in pairwise(commits)):
        return "REWIND", "committed offset went backwards"
    # Rule 3: the time since the last commit exceeds the span of the commits before it.
    now, first, last = window[-1].at, commits[0].at, commits[-1].at
    if now - last > last - first:
        return "STOP", "no commit for longer than the commits span"
    # Rule 4: commits keep coming, all of the same offset.
    if len(commits) >= 2 and all(c.offset == commits[0].offset for c in commits):
        return "STALL", "commits do not move the offset"
    # Rule 5: the consumer moves, but never gains on the producers.
    if all(later.lag >= earlier.lag for earlier, later in pairwise(commits)):
        return "WARN", "lag never decreased"
    return "OK", "lag decreasing"


def evaluate_group(partitions: Sequence[PartitionStatus]) -> GroupStatus:
    """Roll partition statuses up to the group: the worst one, as Burrow does."""
    status: LagStatus = "OK"
    for p in partitions:
        if _RANK[p.status] > _RANK[status]:
            status = p.status
    severity: Severity = "OK" if status == "OK" else "WARN" if status == "WARN" else "ERR"
    max_index: int | None = None
    for i, p in enumerate(partitions):
        if max_index is None or p.lag > partitions[max_index].lag:
            max_index = i
    full = sum(1 for p in partitions if p.complete >= 1.0)
    return GroupStatus(
        status=status,
        severity=severity,
        total_lag=sum(p.lag for p in partitions),
        complete=full / len(partitions) if partitions else 0.0,
        partitions=len(partitions),
        max_lag_index=max_index,
    )
