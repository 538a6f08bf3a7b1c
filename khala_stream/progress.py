"""Progress of long work, per table: rich bars on a terminal, plain log lines otherwise.

`table_progress()` yields a callback of the publisher's `Progress` type, `(table, lines read so
far)`. Totals are not known up front (the export is read as a stream), so a bar shows the count
and the rate; it shows an ETA only when `estimates` gives an expected line count for the table,
such as `estimate_lines` derives from the entry's size and the length of its first lines.
Tables are read one after the other, so a table is finished when the next one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

__all__ = [
    "PROGRESS_EVENTS_ENV",
    "PhaseDisplay",
    "PhaseEvent",
    "ProgressCallback",
    "StageStatus",
    "consumer_lag",
    "estimate_lines",
    "phase_progress",
    "publish_callback",
    "table_progress",
]


class ProgressCallback(Protocol):
    """`(table, lines read so far)`; `done=True` once the table is read to its end."""

    def __call__(self, table: str, lines: int, done: bool = False) -> None: ...


"""Structurally the publisher's `producers.publisher.Progress`."""

_SAMPLE_BYTES: Final = 256 << 10


def estimate_lines(
    export: Path, entries: Mapping[str, str], *, sample_bytes: int = _SAMPLE_BYTES
) -> dict[str, int]:
    """Expected lines per table: entry size / average length of its first lines.

    `entries` maps table -> entry (a ZIP member name, or a path relative to the folder), as
    `ExportSource.tables` does. Exact for entries no longer than the sample; a table that
    cannot be read is left out (no ETA for it).
    """
    estimates: dict[str, int] = {}
    if export.is_dir():
        for table, entry in entries.items():
            file = export / entry
            with contextlib.suppress(OSError):
                with file.open("rb") as handle:
                    head = handle.read(sample_bytes)
                estimates[table] = _estimate(file.stat().st_size, head)
        return estimates
    with contextlib.suppress(OSError, zipfile.BadZipFile), zipfile.ZipFile(export) as archive:
        for table, entry in entries.items():
            with contextlib.suppress(OSError, KeyError, zipfile.BadZipFile, EOFError):
                info = archive.getinfo(entry)
                with archive.open(info) as handle:
                    head = handle.read(sample_bytes)
                estimates[table] = _estimate(info.file_size, head)
    return estimates


def _estimate(size: int, head: bytes) -> int:
    if len(head) >= size:  # the sample is the whole entry: count exactly
        return head.count(b"\n") + (1 if head and not head.endswith(b"\n") else 0)
    lines = head.count(b"\n")
    if lines == 0:
        return 1
    average = (head.rfind(b"\n") + 1) / lines
    return max(1, round(size / average))


@contextlib.contextmanager
def table_progress(
    *,
    label: str = "publish",
    estimates: Mapping[str, int] | None = None,
    stream: IO[str] | None = None,
    interactive: bool | None = None,
    log_every_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[ProgressCallback]:
    """A progress callback for the duration of the block.

    `interactive` defaults to whether `stream` (stderr) is a terminal: then rich bars, redrawn
    in place; otherwise one plain line per table every `log_every_s` seconds and when the
    table is finished. Never raises from the callback for display reasons.
    """
    out = stream if stream is not None else sys.stderr
    tty = out.isatty() if interactive is None else interactive
    if tty:
        bars = _Bars(label, estimates or {}, out)
        with bars.progress:
            try:
                yield bars.update
            finally:
                bars.finish()
    else:
        lines = _Lines(label, estimates or {}, out, log_every_s, clock)
        try:
            yield lines.update
        finally:
            lines.finish()


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} lines/s", style="progress.data.speed")


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        done = f"{task.completed:,.0f}"
        if task.total is None or task.finished:
            return Text(f"{done} lines", style="progress.download")
        return Text(f"{done}/~{task.total:,.0f} lines", style="progress.download")


def _bar_display(
    out: IO[str], description: str, count: ProgressColumn, rate: ProgressColumn
) -> Progress:
    """Rich bars on `out`: description, bar, count, rate, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]" + description),
        BarColumn(),
        count,
        rate,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(file=out, force_terminal=True),
        transient=False,
        # Results go to stdout and may be piped (--json): never capture them into the bars.
        redirect_stdout=False,
    )


class _Bars:
    def __init__(self, label: str, estimates: Mapping[str, int], out: IO[str]) -> None:
        self._label = label
        self._estimates = estimates
        self.progress = _bar_display(out, "{task.description}", _CountColumn(), _RateColumn())
        self._tasks: dict[str, TaskID] = {}
        self._current: str | None = None

    def update(self, table: str, lines: int, done: bool = False) -> None:
        if table != self._current:
            self._close_current()
            self._current = table
        task = self._tasks.get(table)
        if task is None:
            total = self._estimates.get(table)
            task = self.progress.add_task(f"{self._label} {table}", total=total)
            self._tasks[table] = task
        current = self._task(task)
        if current.total is not None and lines > current.total:
            self.progress.update(task, total=None)  # the estimate was short: no ETA
        self.progress.update(task, completed=lines)
        if done:
            self.finish()

    def _close_current(self) -> None:
        if self._current is None:
            return
        task = self._tasks[self._current]
        state = self._task(task)
        done, elapsed = state.completed, state.elapsed
        self.progress.update(task, total=done, completed=done)
        self.progress.stop_task(task)
        # A finished table shows its average rate over the whole table.
        state.finished_speed = done / elapsed if elapsed else None

    def _task(self, task: TaskID) -> Task:
        return next(t for t in self.progress.tasks if t.id == task)

    def finish(self) -> None:
        self._close_current()
        self._current = None


@dataclass(slots=True)
class _TableState:
    started: float
    lines: int = 0
    logged_at: float = 0.0


class _Lines:
    def __init__(
        self,
        label: str,
        estimates: Mapping[str, int],
        out: IO[str],
        every_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._label = label
        self._estimates = estimates
        self._out = out
        self._every = every_s
        self._clock = clock
        self._states: dict[str, _TableState] = {}
        self._current: str | None = None

    def update(self, table: str, lines: int, done: bool = False) -> None:
        now = self._clock()
        if table != self._current:
            self._close_current(now)
            self._current = table
        state = self._states.get(table)
        if state is None:
            state = self._states[table] = _TableState(started=now, logged_at=now)
        state.lines = lines
        if done:
            self.finish()
        elif now - state.logged_at >= self._every:
            state.logged_at = now
            self._write(table, state, now, done=False)

    def _close_current(self, now: float) -> None:
        if self._current is not None:
            self._write(self._current, self._states[self._current], now, done=True)

    def finish(self) -> None:
        self._close_current(self._clock())
        self._current = None

    def _write(self, table: str, state: _TableState, now: float, *, done: bool) -> None:
        elapsed = max(now - state.started, 1e-9)
        rate = state.lines / elapsed
        fields = [f"{self._label}", f"table={table}", f"lines={state.lines}"]
        if done:
            fields += ["done", f"seconds={elapsed:.1f}"]
        fields.append(f"rate={rate:.0f}/s")
        total = self._estimates.get(table)
        if not done and total is not None and rate > 0 and state.lines <= total:
            fields.append(f"eta={(total - state.lines) / rate:.0f}s")
        with contextlib.suppress(OSError, ValueError):  # a closed stream never stops the work
            self._out.write("progress: " + " ".join(fields) + "\n")
            self._out.flush()


# -- phases of an import: publish, store, derive, write -------------------------------------

PROGRESS_EVENTS_ENV: Final = "KHALA_PROGRESS_EVENTS"
"""Set to 1 by `import-chat` for the stages it starts: they then write their progress as
event lines on stdout (read by the parent) instead of logging status lines."""
_EVENT_PREFIX: Final = "khala-progress "
STORE_PHASE: Final = "store documents"
WRITE_PHASE: Final = "write rows"


@dataclass(frozen=True, slots=True)
class PhaseEvent:
    """A phase's progress: items done and the total, each None when this sender does not know
    it (the processor knows the rows it sent, the sink the rows it applied)."""

    phase: str
    done: int | None = None
    total: int | None = None
    finished: bool = False

    def line(self) -> str:
        fields = {"phase": self.phase, "done": self.done, "total": self.total}
        if self.finished:
            fields["finished"] = True
        return _EVENT_PREFIX + json.dumps(fields) + "\n"

    @classmethod
    def parse(cls, line: str) -> PhaseEvent | None:
        """The event a stage wrote on this line, or None for any other line."""
        if not line.startswith(_EVENT_PREFIX):
            return None
        try:
            data = json.loads(line[len(_EVENT_PREFIX) :])
            return cls(
                str(data["phase"]), data.get("done"), data.get("total"), bool(data.get("finished"))
            )
        except (ValueError, KeyError, TypeError):
            return None


class PhaseDisplay(Protocol):
    """Where the phases of an import are shown; several phases may run at once."""

    def update(self, event: PhaseEvent) -> None: ...

    def finish_all(self) -> None: ...


@dataclass(slots=True)
class _PhaseState:
    started: float
    done: int = 0
    total: int | None = None
    logged_at: float = 0.0
    finished: bool = False


class _PhaseLines:
    """One line when a phase starts, every `every_s` while it runs, and when it ends."""

    def __init__(self, out: IO[str], every_s: float, clock: Callable[[], float]) -> None:
        self._out, self._every, self._clock = out, every_s, clock
        self._states: dict[str, _PhaseState] = {}

    def update(self, event: PhaseEvent) -> None:
        now = self._clock()
        state = self._states.get(event.phase)
        new = state is None
        if state is None:
            state = self._states[event.phase] = _PhaseState(started=now, logged_at=now)
        if state.finished:
            return
        if event.done is not None:
            state.done = max(state.done, event.done)
        if event.total is not None:
            state.total = event.total
        if event.finished:
            self._finish(event.phase, state, now)
        elif new or now - state.logged_at >= self._every:
            state.logged_at = now
            self._write(event.phase, state, now)

    def finish_all(self) -> None:
        now = self._clock()
        for phase, state in self._states.items():
            if not state.finished:
                self._finish(phase, state, now)

    def _finish(self, phase: str, state: _PhaseState, now: float) -> None:
        state.finished = True
        self._write(phase, state, now)

    def _write(self, phase: str, state: _PhaseState, now: float) -> None:
        elapsed = now - state.started
        # No rate from a phase too short to time (it would read as billions a second).
        rate = state.done / elapsed if elapsed >= 0.01 else 0.0
        count = f"{state.done}" if state.total is None else f"{state.done}/{state.total}"
        fields = [phase.replace(" ", "_"), f"done={count}"]
        if state.finished:
            fields += ["finished", f"seconds={elapsed:.1f}"]
        fields.append(f"rate={rate:.0f}/s" if rate or not state.done else "rate=-")
        if not state.finished and state.total and rate > 0 and state.done <= state.total:
            fields.append(f"eta={(state.total - state.done) / rate:.0f}s")
        with contextlib.suppress(OSError, ValueError):  # a closed stream never stops the work
            self._out.write("progress: " + " ".join(fields) + "\n")
            self._out.flush()


class _ItemCount(ProgressColumn):
    def render(self, task: Task) -> Text:
        done = f"{task.completed:,.0f}"
        if task.total is None or task.finished:
            return Text(done, style="progress.download")
        return Text(f"{done}/{task.total:,.0f}", style="progress.download")


class _ItemRate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


class _PhaseBars:
    """A rich bar per phase, with count, rate and ETA (when the total is known)."""

    def __init__(self, out: IO[str]) -> None:
        self.progress = _bar_display(out, "{task.description:<22}", _ItemCount(), _ItemRate())
        self._tasks: dict[str, TaskID] = {}
        self._closed: set[TaskID] = set()  # rich's `finished` is only completed >= total

    def update(self, event: PhaseEvent) -> None:
        task = self._tasks.get(event.phase)
        if task is None:
            task = self._tasks[event.phase] = self.progress.add_task(event.phase, total=None)
        if task in self._closed:
            return
        state = next(t for t in self.progress.tasks if t.id == task)
        done = state.completed if event.done is None else max(state.completed, event.done)
        total = state.total if event.total is None else event.total
        if total is not None and done > total:
            total = None  # the estimate was short: no ETA
        if total is None:
            state.total = None  # rich's update() cannot unset a total
        self.progress.update(task, completed=done, total=total)
        if event.finished:
            self._close(task)

    def _close(self, task: TaskID) -> None:
        self._closed.add(task)
        state = next(t for t in self.progress.tasks if t.id == task)
        done, elapsed = state.completed, state.elapsed
        self.progress.update(task, total=done, completed=done)
        self.progress.stop_task(task)
        state.finished_speed = done / elapsed if elapsed else None

    def finish_all(self) -> None:
        for task in self._tasks.values():
            if task not in self._closed:
                self._close(task)


@contextlib.contextmanager
def phase_progress(
    *,
    stream: IO[str] | None = None,
    interactive: bool | None = None,
    log_every_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[PhaseDisplay]:
    """Show the phases of an import while the block runs: rich bars on a terminal (stderr by
    default), plain `progress:` lines otherwise. Every phase is finished when the block ends."""
    out = stream if stream is not None else sys.stderr
    tty = out.isatty() if interactive is None else interactive
    if tty:
        bars = _PhaseBars(out)
        with bars.progress:
            try:
                yield bars
            finally:
                bars.finish_all()
    else:
        lines = _PhaseLines(out, log_every_s, clock)
        try:
            yield lines
        finally:
            lines.finish_all()


def publish_callback(
    display: PhaseDisplay, estimates: Mapping[str, int] | None = None
) -> ProgressCallback:
    """The publisher's `(table, lines, done)` progress as `publish <table>` phases."""
    known = estimates or {}

    def update(table: str, lines: int, done: bool = False) -> None:
        total = lines if done else known.get(table)
        display.update(PhaseEvent(f"publish {table}", lines, total, done))

    return update


class StageStatus:
    """What a running stage tells: counters it keeps, phases it reports.

    Under `import-chat` (KHALA_PROGRESS_EVENTS=1) the phases go to stdout as event lines for
    the parent's display; as a service, `reporting()` logs one INFO line every few seconds
    on the `khala_stream.status` logger (shown without -v), so silence means stopped.
    """

    def __init__(
        self,
        stage: str,
        *,
        events: IO[str] | None = None,
        every_s: float = 5.0,
        min_event_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stage = stage
        self.records_in = 0
        self.rows_out = 0
        self.activity = ""
        """What the stage does now, beyond polling (a derivation phase)."""
        self._events = events
        self._every = every_s
        self._min_event = min_event_interval_s
        self._clock = clock
        self._sent_at: dict[str, float] = {}
        self._reporter: asyncio.Future[None] | None = None
        self._held: dict[tuple[str, bool, bool], PhaseEvent] = {}

    @classmethod
    def from_env(cls, stage: str, env: Mapping[str, str]) -> StageStatus:
        return cls(stage, events=sys.stdout if env.get(PROGRESS_EVENTS_ENV) == "1" else None)

    def phase(
        self, phase: str, done: int | None = None, total: int | None = None, finished: bool = False
    ) -> None:
        if phase in (STORE_PHASE, WRITE_PHASE):
            pass  # counted in the status line already
        elif done is not None and not finished:
            count = f"{done}" if total is None else f"{done}/{total}"
            self.activity = f"{phase} {count}"
        elif finished:
            self.activity = ""
        if self._events is None:
            return
        event = PhaseEvent(phase, done, total, finished)
        now = self._clock()
        if not finished and now - self._sent_at.get(phase, -1e9) < self._min_event:
            # Held back, not lost: the latest value goes out with the next flush.
            self._held[(phase, done is None, total is None)] = event
            return
        self._held.pop((phase, done is None, total is None), None)
        self._sent_at[phase] = now
        self._write(event)

    def _write(self, event: PhaseEvent) -> None:
        assert self._events is not None
        with contextlib.suppress(OSError, ValueError):
            self._events.write(event.line())
            self._events.flush()

    def flush(self) -> None:
        """Send the events held back by the rate limit."""
        held, self._held = self._held, {}
        now = self._clock()
        for (phase, _, _), event in held.items():
            self._sent_at[phase] = now
            self._write(event)

    def status_line(self, lag: int | None, elapsed_s: float, records_before: int) -> str:
        rate = (self.records_in - records_before) / elapsed_s if elapsed_s > 0 else 0.0
        parts = [
            f"{self.stage}: records in={self.records_in} ({rate:.0f}/s)",
            f"rows {'sent' if self.stage == 'process' else 'written'}={self.rows_out}",
            f"lag={'?' if lag is None else lag}",
        ]
        if self.activity:
            parts.append(self.activity)
        return ", ".join(parts)

    def start(self, lag: Callable[[], Awaitable[int | None]]) -> None:
        """Until `stop()`: as a service, log the status line every few seconds; under
        `import-chat`, send the events held back by the rate limit."""
        if self._reporter is None:
            work = self._report(lag) if self._events is None else self._flushing()
            self._reporter = asyncio.ensure_future(work)

    async def stop(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter
            self._reporter = None
        if self._events is not None:
            self.flush()

    async def _flushing(self) -> None:
        while True:
            await asyncio.sleep(self._min_event)
            self.flush()

    def sent(self, rows: int) -> None:
        """The processor sent `rows` more rows to the changes topic."""
        self.rows_out += rows
        self.phase(WRITE_PHASE, total=self.rows_out)

    def applied(self, records: int, rows: int) -> None:
        """The sink applied `records` change messages holding `rows` rows."""
        self.records_in += records
        self.rows_out += rows
        self.phase(WRITE_PHASE, done=self.rows_out)

    def stored(self, documents: int) -> None:
        """The processor stored `documents` more documents."""
        self.records_in += documents
        self.phase(STORE_PHASE, done=self.records_in)

    async def _report(self, lag: Callable[[], Awaitable[int | None]]) -> None:
        log = logging.getLogger("khala_stream.status")
        before, at = self.records_in, self._clock()
        while True:
            await asyncio.sleep(self._every)
            try:  # bounded: a partition without a position yet must not silence the line
                behind = await asyncio.wait_for(lag(), timeout=self._every / 2)
            except Exception:  # the status line never stops the stage
                behind = None
            now = self._clock()
            log.info("%s", self.status_line(behind, now - at, before))
            before, at = self.records_in, now


async def consumer_lag(consumer: AIOKafkaConsumer) -> int | None:
    """Records between the consumer's positions and the ends of its partitions."""
    assigned = list(consumer.assignment())
    if not assigned:
        return None
    ends = await consumer.end_offsets(assigned)
    behind = 0
    for tp in assigned:
        behind += max(0, ends[tp] - await consumer.position(tp))
    return behind
