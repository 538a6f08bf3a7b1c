"""Peak resident memory of a process tree, from /proc (Linux), and timed child processes.

Two sources, combined:

- a sampler thread finds the root's descendants (by parent pid, from `/proc/*/stat`) and
  reads their `/proc/<pid>/status` every `interval` seconds: `VmHWM` (the kernel's own
  high-water mark of each process, so a spike between two samples is not missed while the
  process lives) and `VmRSS` (summed over the tree, for the tree's peak);
- `os.wait4` on the root returns `ru_maxrss`: the largest peak of the root and of the children
  it reaped, exact even for growth in the last milliseconds. It bounds the tree's largest
  process; it is the root's own peak only when the root had no children.

Excluded pids (the broker) are never counted, nor are their descendants.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Measured",
    "ProcessPeak",
    "TreeSampler",
    "cpu_seconds",
    "read_status_kb",
    "run_measured",
]

_PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")


def read_status_kb(pid: int) -> dict[str, int]:
    """`VmRSS` / `VmHWM` (kB) of a live process; empty when it is gone or a zombie."""
    try:
        text = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            parts = rest.split()
            if parts:
                out[key] = int(parts[0])
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a live process, its live descendants, and every descendant
    it has reaped (PostgreSQL's postmaster reaps its backends); 0 when it is gone."""
    total = 0.0
    children = _parents()
    pending = [pid]
    while pending:
        current = pending.pop()
        if (fields := _stat_fields(current)) is None:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of stat, 12-15 after "pid (comm)".
        total += sum(int(f) for f in fields[11:15]) / _TICKS
        pending += children.get(current, [])
    return total


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` alone (not its children); 0 when it is gone."""
    if (fields := _stat_fields(pid)) is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after "pid (comm)" (comm may hold spaces and
    parentheses, so split after it): state, ppid, …; None when the process is gone."""
    try:
        return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _name(pid: int) -> str:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if args and Path(args[0]).name.startswith("python"):
        args = args[1:]  # the interpreter says nothing: name the script or module
    if len(args) >= 2 and args[0] == "-m":
        # "python -m bench.direct EXPORT …" → "bench.direct"; "-m khala_stream sink" → both
        words = args[1:3] if len(args) >= 3 and "/" not in args[2] else args[1:2]
        return " ".join(words)
    # "…/khala-stream import-chat …" → "khala-stream import-chat"
    return " ".join([Path(args[0]).name, *args[1:2]]) if args else "?"


def _parents() -> dict[int, list[int]]:
    """Children of every process, from `/proc/<pid>/stat` (the kernels here have no
    `/proc/<pid>/task/<tid>/children`)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None and len(fields) >= 2 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


@dataclass(slots=True)
class ProcessPeak:
    pid: int
    name: str
    peak_kb: int = 0
    cpu_seconds: float = 0.0
    """Its own user + system CPU at the last sample (what it used after that is not seen)."""


@dataclass(slots=True)
class _State:
    processes: dict[int, ProcessPeak] = field(default_factory=dict)
    tree_peak_kb: int = 0
    samples: int = 0


class TreeSampler:
    """Samples a process tree in a background thread until `stop()`."""

    def __init__(
        self, root_pid: int, *, exclude: Sequence[int] = (), interval: float = 0.2
    ) -> None:
        self.root_pid = root_pid
        self._exclude = frozenset(exclude)
        self._interval = interval
        self._state = _State()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def processes(self) -> dict[int, ProcessPeak]:
        return self._state.processes

    @property
    def tree_peak_kb(self) -> int:
        return self._state.tree_peak_kb

    def sample(self) -> None:
        """One pass over the tree (also callable directly, e.g. right before a stop)."""
        total = 0
        children = _parents()
        todo = [self.root_pid]
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid in self._exclude:
                continue
            seen.add(pid)
            status = read_status_kb(pid)
            if not status:
                continue
            entry = self._state.processes.get(pid)
            if entry is None:
                entry = self._state.processes[pid] = ProcessPeak(pid, _name(pid))
            elif self._state.samples % 10 == 0:
                entry.name = _name(pid)  # it may have exec'd since (a wrapper script, a shim)
            entry.peak_kb = max(entry.peak_kb, status.get("VmHWM", 0), status.get("VmRSS", 0))
            entry.cpu_seconds = max(entry.cpu_seconds, own_cpu_seconds(pid))
            total += status.get("VmRSS", 0)
            todo += children.get(pid, [])
        self._state.tree_peak_kb = max(self._state.tree_peak_kb, total)
        self._state.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)


@dataclass(frozen=True, slots=True)
class Measured:
    """A finished child process: wall time, exit code, output and memory."""

    argv: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss_kb: int
    """The largest peak of any one process of the tree (the per-process target)."""
    tree_peak_kb: int
    """The largest sampled sum of the tree's resident memory."""
    processes: list[ProcessPeak]
    cpu_seconds: float = 0.0
    """User + system CPU of the child and the descendants it reaped (wait4's rusage)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def stderr_tail(self, lines: int = 25) -> str:
        return "\n".join(self.stderr.strip().splitlines()[-lines:])


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    exclude: Sequence[int] = (),
    timeout: float | None = None,
    log_dir: Path,
    label: str,
) -> Measured:
    """Run `argv` to completion; wall time from spawn to reap, peak RSS of its tree.

    Output goes to files under `log_dir` (a chatty child never blocks on a full pipe).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{label}.stdout", log_dir / f"{label}.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        began = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        sampler = TreeSampler(proc.pid, exclude=exclude).start()
        try:
            status, rusage, cpu = _wait(proc, timeout)
        finally:
            sampler.stop()
            if proc.returncode is None:  # timed out or interrupted: end it, and its children
                _terminate(proc, sampler)
        seconds = time.perf_counter() - began
    root = sampler.processes.get(proc.pid)
    if root is not None and len(sampler.processes) == 1:
        root.peak_kb = max(root.peak_kb, rusage)  # ru_maxrss is in kB on Linux
    peaks = sorted(sampler.processes.values(), key=lambda p: -p.peak_kb)
    return Measured(
        argv=list(argv),
        seconds=seconds,
        returncode=status,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        peak_rss_kb=max([rusage, *(p.peak_kb for p in peaks)]),
        tree_peak_kb=max(sampler.tree_peak_kb, rusage),
        processes=peaks,
        cpu_seconds=cpu,
    )


def _wait(proc: subprocess.Popen[bytes], timeout: float | None) -> tuple[int, int, float]:
    """Reap the child with wait4 (for ru_maxrss and its CPU time); raises TimeoutError after
    `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code  # Popen must not wait for it again
            return code, int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not finish within {timeout:.0f}s")
        time.sleep(0.02)


def _terminate(proc: subprocess.Popen[bytes], sampler: TreeSampler) -> None:
    """SIGTERM the child and the descendants the sampler saw, then SIGKILL what remains."""
    pids = [proc.pid, *(p for p in sampler.processes if p != proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, 15)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        proc.wait(timeout=10)
