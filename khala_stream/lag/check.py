"""`lag --check`: a lag report judged as a monitoring plugin (Nagios, Icinga, cron) expects.

The plugin convention: one line on stdout, `LAG <STATE> - <what> | <perfdata>`, and the exit
code says the state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the broker cannot be reached or
the check cannot run). A group's state is the worse of

- its Burrow verdict (`rules`): severity WARN is WARNING, ERR (STOP, STALL, REWIND) CRITICAL;
- the thresholds: the oldest unconsumed message's age (`lag_seconds`) and, when given, the
  total lag in messages, each against a warning and a critical limit (inclusive);

and the check's state is the worst group's (and, for a database that `follow` feeds, how far
it is behind the deployment, against the same seconds limits). Pure: a report and thresholds
in, a result out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from khala_stream.lag.report import GroupLag, LagReport

__all__ = [
    "CHECK_EXIT_CODES",
    "DEFAULT_CRIT_SECONDS",
    "DEFAULT_WARN_SECONDS",
    "CheckResult",
    "CheckState",
    "Thresholds",
    "check_report",
    "unknown",
]

CheckState = Literal["OK", "WARNING", "CRITICAL", "UNKNOWN"]
CHECK_EXIT_CODES: Final[dict[CheckState, int]] = {
    "OK": 0,
    "WARNING": 1,
    "CRITICAL": 2,
    "UNKNOWN": 3,
}
DEFAULT_WARN_SECONDS: Final = 300.0
DEFAULT_CRIT_SECONDS: Final = 900.0
"""As the KhalaLagTooOld alert (infra/prometheus/alerts.yml): 15 minutes is critical."""

_SEVERITY_STATE: Final[dict[str, CheckState]] = {"OK": "OK", "WARN": "WARNING", "ERR": "CRITICAL"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Limits at or above which a group is WARNING or CRITICAL; None: no such limit."""

    warn_seconds: float | None = DEFAULT_WARN_SECONDS
    crit_seconds: float | None = DEFAULT_CRIT_SECONDS
    warn_lag: int | None = None
    crit_lag: int | None = None

    def problems(self) -> list[str]:
        """What is wrong with these thresholds, in words (empty when they make sense)."""
        out = [
            f"--{name.replace('_', '-')} must be at least 0, not {value}"
            for name, value in (
                ("warn_seconds", self.warn_seconds),
                ("crit_seconds", self.crit_seconds),
                ("warn_lag", self.warn_lag),
                ("crit_lag", self.crit_lag),
            )
            if value is not None and not value >= 0  # nan too
        ]
        for warn, crit, unit in (
            (self.warn_seconds, self.crit_seconds, "seconds"),
            (self.warn_lag, self.crit_lag, "lag"),
        ):
            if warn is not None and crit is not None and warn > crit:
                out.append(f"--warn-{unit} ({warn:g}) is above --crit-{unit} ({crit:g})")
        return out


@dataclass(frozen=True, slots=True)
class CheckResult:
    state: CheckState
    summary: str
    """The whole plugin line: `LAG <STATE> - ... | perfdata`."""

    @property
    def exit_code(self) -> int:
        return CHECK_EXIT_CODES[self.state]


def unknown(reason: str) -> CheckResult:
    """The check could not judge (broker unreachable, bad options): UNKNOWN, exit 3."""
    return CheckResult("UNKNOWN", f"LAG UNKNOWN - {' '.join(reason.split())}")


def _worse(a: CheckState, b: CheckState) -> CheckState:
    return a if CHECK_EXIT_CODES[a] >= CHECK_EXIT_CODES[b] else b


def _limit(value: float, warn: float | None, crit: float | None) -> CheckState:
    if crit is not None and value >= crit:
        return "CRITICAL"
    if warn is not None and value >= warn:
        return "WARNING"
    return "OK"


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def _judge_group(group: GroupLag, limits: Thresholds) -> tuple[CheckState, str]:
    state = _SEVERITY_STATE[group.severity]
    words = [f"{group.group} {group.status}", f"lag {group.total_lag}"]
    age = _limit(group.max_lag_seconds, limits.warn_seconds, limits.crit_seconds)
    if age != "OK":
        bound = limits.crit_seconds if age == "CRITICAL" else limits.warn_seconds
        words.append(f"oldest {_seconds(group.max_lag_seconds)} >= {bound:g}s")
    elif group.total_lag:
        words.append(f"oldest {_seconds(group.max_lag_seconds)}")
    count = _limit(group.total_lag, limits.warn_lag, limits.crit_lag)
    if count != "OK":
        words.append(f">= {limits.crit_lag if count == 'CRITICAL' else limits.warn_lag} messages")
    return _worse(_worse(state, age), count), " ".join(words)


def _perfdata(group: GroupLag, limits: Thresholds) -> str:
    def bound(value: float | None) -> str:
        return "" if value is None else f"{value:g}"

    name = group.group
    lag = f"{group.total_lag};{bound(limits.warn_lag)};{bound(limits.crit_lag)};0"
    seconds = f"{group.max_lag_seconds:.3f}s"
    age = f"{seconds};{bound(limits.warn_seconds)};{bound(limits.crit_seconds)};0"
    return f"'{name}_lag'={lag} '{name}_lag_seconds'={age}"


def check_report(
    report: LagReport, limits: Thresholds, *, source_behind_s: float | None = None
) -> CheckResult:
    """Judge every group of `report`; the worst group decides the state. `source_behind_s`:
    how far `follow` is behind the deployment it follows (None: it follows none), judged
    against the same seconds limits as a group's oldest message."""
    if not report.groups:
        return unknown("no consumer group to check")
    state: CheckState = "OK"
    parts: list[str] = []
    for group in report.groups:
        group_state, words = _judge_group(group, limits)
        state = _worse(state, group_state)
        parts.append(words)
    perf = " ".join(_perfdata(g, limits) for g in report.groups)
    if source_behind_s is not None:
        behind = _limit(source_behind_s, limits.warn_seconds, limits.crit_seconds)
        state = _worse(state, behind)
        parts.append(f"source behind {_seconds(source_behind_s)}")
        warn = "" if limits.warn_seconds is None else f"{limits.warn_seconds:g}"
        crit = "" if limits.crit_seconds is None else f"{limits.crit_seconds:g}"
        perf += f" 'source_behind_seconds'={source_behind_s:.3f}s;{warn};{crit};0"
    return CheckResult(state, f"LAG {state} - {'; '.join(parts)} | {perf}")
