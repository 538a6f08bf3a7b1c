"""`lag --check` as a monitoring plugin: the state and exit code for each Burrow status and each
threshold, the one-line summary and its perfdata (khala_stream.lag.check, pure)."""

from __future__ import annotations

import pytest

from khala_stream.lag import (
    GroupLag,
    LagReport,
    LagStatus,
    Severity,
    Thresholds,
    check_report,
    unknown,
)

SEVERITY: dict[LagStatus, Severity] = {
    "OK": "OK",
    "WARN": "WARN",
    "STOP": "ERR",
    "STALL": "ERR",
    "REWIND": "ERR",
}


def group(name: str, status: LagStatus = "OK", *, lag: int = 0, oldest: float = 0.0) -> GroupLag:
    return GroupLag(
        group=name,
        status=status,
        severity=SEVERITY[status],
        total_lag=lag,
        max_lag_seconds=oldest,
        rate=None,
        time_to_drain=None,
        complete=1.0,
        partitions=(),
    )


def report(*groups: GroupLag) -> LagReport:
    return LagReport(taken_at=0.0, samples=5, groups=groups)


@pytest.mark.parametrize(
    ("status", "state", "code"),
    [
        ("OK", "OK", 0),
        ("WARN", "WARNING", 1),
        ("STOP", "CRITICAL", 2),
        ("STALL", "CRITICAL", 2),
        ("REWIND", "CRITICAL", 2),
    ],
)
def test_burrow_status_decides_the_exit_code(status: LagStatus, state: str, code: int) -> None:
    result = check_report(report(group("k.process"), group("k.sink", status, lag=7)), Thresholds())
    assert (result.state, result.exit_code) == (state, code)
    assert result.summary.startswith(f"LAG {state} - k.process OK lag 0; k.sink {status} lag 7")
    assert "\n" not in result.summary


def test_the_worst_group_wins() -> None:
    result = check_report(
        report(group("a", "WARN", lag=1), group("b", "STOP", lag=1), group("c")), Thresholds()
    )
    assert (result.state, result.exit_code) == ("CRITICAL", 2)


@pytest.mark.parametrize(
    ("oldest", "state"),
    [(299.9, "OK"), (300.0, "WARNING"), (899.0, "WARNING"), (900.0, "CRITICAL")],
)
def test_age_thresholds_default_to_five_and_fifteen_minutes(oldest: float, state: str) -> None:
    result = check_report(report(group("k.sink", lag=3, oldest=oldest)), Thresholds())
    assert result.state == state
    if state != "OK":
        bound = "900s" if state == "CRITICAL" else "300s"
        assert f">= {bound}" in result.summary


def test_message_thresholds_are_off_unless_given() -> None:
    busy = report(group("k.sink", lag=1_000_000, oldest=1.0))
    assert check_report(busy, Thresholds()).state == "OK"
    assert check_report(busy, Thresholds(warn_lag=1000)).state == "WARNING"
    critical = check_report(busy, Thresholds(warn_lag=1000, crit_lag=500_000))
    assert critical.state == "CRITICAL"
    assert ">= 500000 messages" in critical.summary


def test_thresholds_only_worsen_a_burrow_verdict() -> None:
    # A stopped consumer with fresh lag is still CRITICAL under generous limits.
    stopped = report(group("k.sink", "STOP", lag=2, oldest=1.0))
    assert check_report(stopped, Thresholds(warn_seconds=None, crit_seconds=None)).state == (
        "CRITICAL"
    )


def test_perfdata_carries_lag_age_and_limits() -> None:
    result = check_report(
        report(group("k.sink", lag=12, oldest=4.25)), Thresholds(warn_lag=10, crit_lag=100)
    )
    text, perf = result.summary.split(" | ")
    assert text == "LAG WARNING - k.sink OK lag 12 oldest 4.2s >= 10 messages"
    assert perf == "'k.sink_lag'=12;10;100;0 'k.sink_lag_seconds'=4.250s;300;900;0"


def test_unknown_is_exit_3_on_one_line() -> None:
    result = unknown("cannot read consumer offsets from the broker:\n  refused")
    assert (result.state, result.exit_code) == ("UNKNOWN", 3)
    assert result.summary == "LAG UNKNOWN - cannot read consumer offsets from the broker: refused"
    assert check_report(report(), Thresholds()).state == "UNKNOWN"


def test_threshold_problems() -> None:
    assert Thresholds().problems() == []
    assert Thresholds(warn_seconds=60, crit_seconds=30).problems() == [
        "--warn-seconds (60) is above --crit-seconds (30)"
    ]
    assert Thresholds(warn_lag=-1).problems() == ["--warn-lag must be at least 0, not -1"]
    nan = float("nan")
    assert Thresholds(warn_seconds=nan).problems() == ["--warn-seconds must be at least 0, not nan"]


@pytest.mark.parametrize(
    ("behind", "state"), [(0.0, "OK"), (300.0, "WARNING"), (900.0, "CRITICAL")]
)
def test_a_followed_deployment_is_judged_by_how_far_behind_it_is(behind: float, state: str) -> None:
    result = check_report(report(group("k.sink")), Thresholds(), source_behind_s=behind)
    assert result.state == state
    assert f"; source behind {behind:.0f}" in result.summary
    assert result.summary.endswith(f"'source_behind_seconds'={behind:.3f}s;300;900;0")
    assert "source" not in check_report(report(group("k.sink")), Thresholds()).summary
