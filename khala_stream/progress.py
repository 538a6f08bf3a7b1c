"""Progress of long work, per table: rich bars on a terminal, plain log lines otherwise.

`table_progress()` yields a callback of the publisher's `Progress` type, `(table, lines read so
far)`. Totals are not known up front (the export is read as a stream), so a bar shows the count
and the rate; it shows an ETA only when `estimates` gives an expected line count for the table,
such as `estimate_lines` derives from the entry's size and the length of its first lines.
Tables are read one after the other, so a table is finished when the next one starts.
"""

from __future__ import annotations

import contextlib
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Protocol

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

__all__ = ["ProgressCallback", "estimate_lines", "table_progress"]


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


class _Bars:
    def __init__(self, label: str, estimates: Mapping[str, int], out: IO[str]) -> None:
        self._label = label
        self._estimates = estimates
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            _CountColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(file=out, force_terminal=True),
            transient=False,
            # Results go to stdout and may be piped (--json): never capture them into the bars.
            redirect_stdout=False,
        )
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
