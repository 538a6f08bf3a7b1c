"""The phases of an import as lines (no terminal) and the stages' progress events."""

from __future__ import annotations

import io

from khala_stream.progress import PhaseEvent, StageStatus, phase_progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_phase_at_start_every_few_seconds_and_at_the_end() -> None:
    out, clock = io.StringIO(), _Clock()
    with phase_progress(stream=out, interactive=False, log_every_s=5, clock=clock) as display:
        display.update(PhaseEvent("derive messages", 0, 1000))
        display.update(PhaseEvent("write rows", total=50))  # another phase at the same time
        clock.now = 2
        display.update(PhaseEvent("derive messages", 200))  # not due yet: no line
        clock.now = 6
        display.update(PhaseEvent("derive messages", 600))
        display.update(PhaseEvent("write rows", done=40))
        clock.now = 8
        display.update(PhaseEvent("derive messages", 1000, 1000, finished=True))
        display.update(PhaseEvent("derive messages", 5))  # after its end: ignored
    lines = out.getvalue().splitlines()
    assert lines == [
        "progress: derive_messages done=0/1000 rate=0/s",
        "progress: write_rows done=0/50 rate=0/s",
        "progress: derive_messages done=600/1000 rate=100/s eta=4s",
        "progress: write_rows done=40/50 rate=7/s eta=2s",
        "progress: derive_messages done=1000/1000 finished seconds=8.0 rate=125/s",
        "progress: write_rows done=40/50 finished seconds=8.0 rate=5/s",  # the block ended
    ]


def test_events_round_trip_and_other_lines_are_not_events() -> None:
    event = PhaseEvent("store documents", 10, None, finished=True)
    assert PhaseEvent.parse(event.line()) == event
    assert PhaseEvent.parse("2026-01-01 INFO khala_stream: hello\n") is None
    assert PhaseEvent.parse("khala-progress {not json\n") is None


def test_a_stage_holds_back_fast_events_and_flushes_the_latest() -> None:
    out, clock = io.StringIO(), _Clock()
    status = StageStatus("sink", events=out, min_event_interval_s=0.5, clock=clock)
    status.applied(records=1, rows=10)
    status.applied(records=1, rows=10)  # within the interval: held back
    status.applied(records=1, rows=10)
    sent = [PhaseEvent.parse(line) for line in out.getvalue().splitlines()]
    assert [e.done for e in sent if e] == [10]
    status.flush()
    sent = [PhaseEvent.parse(line) for line in out.getvalue().splitlines()]
    assert [e.done for e in sent if e] == [10, 30]  # the latest value, not lost
    assert status.status_line(lag=4, elapsed_s=1.0, records_before=0) == (
        "sink: records in=3 (3/s), rows written=30, lag=4"
    )
