"""Burrow's lag rules over sampled windows: one test per rule, their order, the group roll-up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import pytest

from khala_stream import metrics
from khala_stream.lag import (
    LAG_STATUSES,
    LagStatus,
    OffsetSample,
    PartitionStatus,
    SampleWindow,
    commits_in,
    consumption_rate,
    evaluate_group,
    evaluate_partition,
)

Row = tuple[float, int | None, int]


def window(*rows: Row, commit_ids: Sequence[str | None] | None = None) -> list[OffsetSample]:
    """Samples from (time, committed, end) rows; optional commit metadata per row."""
    ids = list(commit_ids) if commit_ids is not None else [None] * len(rows)
    return [
        OffsetSample(at=t, committed=c, end=e, commit_id=i)
        for (t, c, e), i in zip(rows, ids, strict=True)
    ]


def status(*rows: Row, commit_ids: Sequence[str | None] | None = None) -> PartitionStatus:
    return evaluate_partition(window(*rows, commit_ids=commit_ids))


# ------------------------------------------------------------------ lag and no lag
def test_no_lag_is_ok_whatever_the_history() -> None:
    # Even a rewind: the consumer is at the end now.
    s = status((0, 50, 100), (1, 10, 100), (2, 100, 100))
    assert (s.status, s.lag, s.time_to_drain) == ("OK", 0, 0.0)


def test_one_sample_cannot_be_judged() -> None:
    s = evaluate_partition(window((0, 10, 100)), intervals=10)
    assert s.status == "OK"
    assert s.rule == "too few samples to judge"
    assert s.complete == pytest.approx(0.1)
    assert s.rate is None and s.time_to_drain is None


def test_empty_window() -> None:
    s = evaluate_partition([])
    assert (s.status, s.lag, s.complete) == ("OK", 0, 0.0)


# ------------------------------------------------------------------ rule 1: lag touched zero
def test_rule1_lag_zero_within_window_is_ok() -> None:
    # The consumer was caught up at t=1; new messages arrived since and it has not committed:
    # without rule 1 this would be a STOP.
    s = status((0, 90, 100), (1, 100, 100), (2, 100, 120), (3, 100, 130), (4, 100, 140))
    assert s.status == "OK"
    assert s.rule == "lag was zero within the window"


def test_rule1_comes_before_rewind() -> None:
    # Rule order: a window that touched zero lag is OK even though the offset went back.
    s = status((0, 100, 100), (1, 40, 100), (2, 50, 100), (3, 60, 100))
    assert s.status == "OK"


# ------------------------------------------------------------------ rule 2: rewind
def test_rule2_offset_going_backwards_is_rewind() -> None:
    s = status((0, 50, 100), (1, 60, 100), (2, 20, 100), (3, 30, 100))
    assert s.status == "REWIND"


def test_rule2_comes_before_stop() -> None:
    # The rewind is the last commit seen, long ago: still REWIND, not STOP.
    s = status((0, 50, 100), (1, 20, 100), (2, 20, 100), (3, 20, 100), (9, 20, 100))
    assert s.status == "REWIND"


# ------------------------------------------------------------------ rule 3: stop
def test_rule3_no_commit_for_longer_than_the_commit_span_is_stop() -> None:
    # Commits at t=0,1,2 then nothing until now=5: 5 - 2 > 2 - 0.
    s = status((0, 10, 100), (1, 20, 100), (2, 30, 100), (3, 30, 100), (4, 30, 100), (5, 30, 100))
    assert s.status == "STOP"
    assert s.rule == "no commit for longer than the commits span"


def test_rule3_boundary_is_strict() -> None:
    # Commits at t=0,1,2; now=4: 4 - 2 == 2 - 0, not greater: still moving (lag decreasing).
    s = status((0, 10, 100), (1, 20, 100), (2, 30, 100), (3, 30, 100), (4, 30, 100))
    assert s.status == "OK"


def test_rule3_a_group_that_never_moved_in_the_window_is_stop() -> None:
    s = status((0, 10, 100), (1, 10, 100))
    assert s.status == "STOP"
    # A group without any committed offset reads from the log start: its lag is all of it.
    s = evaluate_partition(
        [
            OffsetSample(at=0, committed=None, end=100, start=5),
            OffsetSample(at=1, committed=None, end=100, start=5),
        ]
    )
    assert (s.status, s.lag) == ("STOP", 95)


def test_rule3_comes_before_stall() -> None:
    # Repeated commits of one offset (told apart by their metadata), then silence: STOP.
    s = status(
        (0, 10, 100), (1, 10, 100), (2, 10, 100), (9, 10, 100), commit_ids=["a", "b", "c", "c"]
    )
    assert s.status == "STOP"


# ------------------------------------------------------------------ rule 4: stall
def test_rule4_commits_that_do_not_move_are_stall() -> None:
    s = status(
        (0, 10, 100), (1, 10, 100), (2, 10, 100), (3, 10, 100), commit_ids=["a", "b", "c", "d"]
    )
    assert s.status == "STALL"
    assert s.commits == 4


def test_rule4_needs_commit_metadata_to_see_repeated_commits() -> None:
    # Without metadata, the same samples show a single commit, hence STOP (rule 3).
    s = status((0, 10, 100), (1, 10, 100), (2, 10, 100), (3, 10, 100))
    assert s.status == "STOP"
    assert s.commits == 1


def test_rule4_comes_before_warn() -> None:
    # Stalled commits while the producer adds messages: lag never decreases, but STALL wins.
    s = status((0, 10, 100), (1, 10, 110), (2, 10, 120), (3, 10, 130), commit_ids=list("abcd"))
    assert s.status == "STALL"


# ------------------------------------------------------------------ rule 5: warn
def test_rule5_moving_but_never_gaining_is_warn() -> None:
    s = status((0, 10, 100), (1, 20, 120), (2, 30, 140), (3, 40, 160))
    assert s.status == "WARN"
    assert s.rate == pytest.approx(10.0)
    assert s.time_to_drain == pytest.approx(12.0)  # lag 120 at 10 msg/s


def test_rule5_equal_lag_counts_as_not_decreasing() -> None:
    s = status((0, 10, 100), (1, 20, 110), (2, 30, 120))
    assert s.status == "WARN"


def test_lag_decreasing_somewhere_is_ok() -> None:
    s = status((0, 10, 100), (1, 20, 120), (2, 40, 130), (3, 50, 150))
    assert s.status == "OK"
    assert s.rule == "lag decreasing"


# ------------------------------------------------------------------ derived figures
def test_commits_are_changes_of_offset_or_metadata() -> None:
    w = window(
        (0, 10, 100), (1, 10, 100), (2, 15, 100), (3, 15, 100), commit_ids=[None, None, "x", "y"]
    )
    assert [(c.at, c.offset, c.lag) for c in commits_in(w)] == [
        (0, 10, 90),
        (2, 15, 85),
        (3, 15, 85),
    ]


def test_rate_and_drain() -> None:
    w = window((0, 0, 1000), (10, 100, 1000))
    assert consumption_rate(w) == pytest.approx(10.0)
    s = evaluate_partition(w)
    assert s.time_to_drain == pytest.approx(90.0)
    # No progress: no rate to drain at.
    s = status((0, 0, 1000), (10, 0, 1000))
    assert s.rate == 0.0 and s.time_to_drain is None


def test_committed_beyond_end_is_no_lag() -> None:
    s = status((0, 120, 100), (1, 120, 100))
    assert (s.status, s.lag) == ("OK", 0)


def test_complete_follows_window_capacity() -> None:
    w = window((0, 0, 10), (1, 1, 10), (2, 2, 10))
    assert evaluate_partition(w, intervals=6).complete == pytest.approx(0.5)
    assert evaluate_partition(w, intervals=3).complete == 1.0
    assert evaluate_partition(w).complete == 1.0


# ------------------------------------------------------------------ the group roll-up
def _p(status: LagStatus, lag: int = 1, complete: float = 1.0) -> PartitionStatus:
    return PartitionStatus(
        status=status, lag=lag, rate=None, time_to_drain=None, complete=complete, commits=1, rule=""
    )


@pytest.mark.parametrize(
    ("statuses", "expected", "severity"),
    [
        (["OK", "OK"], "OK", "OK"),
        (["OK", "WARN"], "WARN", "WARN"),
        (["WARN", "STOP", "OK"], "STOP", "ERR"),
        (["STOP", "STALL"], "STALL", "ERR"),
        (["STALL", "REWIND", "WARN"], "REWIND", "ERR"),
    ],
)
def test_group_takes_the_worst_partition_in_burrows_order(
    statuses: list[LagStatus], expected: LagStatus, severity: str
) -> None:
    g = evaluate_group([_p(s) for s in statuses])
    assert (g.status, g.severity) == (expected, severity)


def test_group_totals_and_completeness() -> None:
    g = evaluate_group([_p("OK", 5), _p("WARN", 30, complete=0.5), _p("OK", 0)])
    assert g.total_lag == 35
    assert g.max_lag_index == 1
    assert g.complete == pytest.approx(2 / 3)
    assert g.partitions == 3
    empty = evaluate_group([])
    assert (empty.status, empty.total_lag, empty.max_lag_index) == ("OK", 0, None)


def test_statuses_are_one_closed_set() -> None:
    assert set(get_args(LagStatus)) == set(LAG_STATUSES) == set(metrics.STATUSES)


# ------------------------------------------------------------------ the long-running window
def _fed(capacity: int, rows: Sequence[Row]) -> SampleWindow:
    w = SampleWindow(capacity)
    for sample in window(*rows):
        w.add(sample)
    return w


def test_sample_window_keeps_commits_older_than_its_samples() -> None:
    # A slow committer (every 10 s) sampled every 2 s: the last 3 samples alone show no commit,
    # the last 3 commits do, and rule 3 measures the silence against the commits' span.
    rows: list[Row] = [(float(t), 10 * (t // 10), 1000) for t in range(0, 40, 2)]
    w = _fed(3, rows)
    judged = w.window()
    assert [s.at for s in judged] == [10, 20, 30, 34, 36, 38]
    assert [c.at for c in commits_in(judged)] == [10, 20, 30]
    assert w.samples == 3 and w.complete == 1.0
    assert evaluate_partition(judged).status == "OK"  # 38 - 30 < 30 - 10, lag decreasing
    # The same samples as a plain window of 3: no commit seen within it, hence STOP.
    assert evaluate_partition(window(*rows[-3:])).status == "STOP"


def test_sample_window_stop_adapts_to_the_commit_interval() -> None:
    rows: list[Row] = [(float(t), 10 * (t // 10), 1000) for t in range(0, 40, 2)]
    # The commits stop at t=30; STOP once the silence exceeds the span of the kept commits.
    rows += [(float(t), 30, 1000) for t in range(40, 56, 2)]
    statuses = {}
    w = SampleWindow(3)
    for sample in window(*rows):
        w.add(sample)
        statuses[sample.at] = evaluate_partition(w.window()).status
    assert statuses[50] == "OK"  # 50 - 30 == 30 - 10
    assert statuses[52] == "STOP"


def test_sample_window_forgets_old_commits_and_sees_recent_zero_lag() -> None:
    rows: list[Row] = [(0, 0, 10), (1, 5, 10), (2, 10, 10), (3, 10, 20), (4, 10, 30)]
    w = _fed(2, rows)
    judged = w.window()
    # Commits kept: the last two (t=1, t=2); samples kept: t=3, t=4.
    assert [s.at for s in judged] == [1, 2, 3, 4]
    assert evaluate_partition(judged).status == "OK"  # lag was 0 at t=2
    with pytest.raises(ValueError, match="oldest first"):
        w.add(OffsetSample(at=0, committed=0, end=0))
    assert SampleWindow(4).window() == [] and SampleWindow(4).latest is None
