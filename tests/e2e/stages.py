"""The three stages as separate processes, as an operator runs them, for order and crash tests.

`Stages` starts N `process` and M `sink` workers (long-running, one consumer group each), runs
`publish --incremental` to completion or in the background, kills and restarts any of them,
and waits until the newest import run has been applied by the sink. Every wait has a
deadline and fails with the case's seed and the tail of each process's stderr (kept in files
under `log_dir`).

What the harness works around, and why (none of it changes what the product is asked to do):

- The harness creates the importer's tables before starting workers, so that every case starts
  from the same point. (Workers started together on a fresh database used to race in
  `init_db` and some exited 1; `init_db` now takes an advisory lock, tested in
  tests/contract/test_schema.py.)
- Nothing else: a killed worker's consumer-group membership is the product's problem (the
  stages assign their partitions by hand, `khala_stream/runtime.py`), so the harness never
  evicts a group member nor waits for a group to settle.

Also here: fresh PostgreSQL databases on the session's server, and baselines — the end state
of a clean sequential `import-chat` of an export on a fresh database, cached per export.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs
from khala_stream.db.engine import create_engine, init_db
from khala_stream.db.importer_tables import RUNS
from processors.derive import COUNTER_KEYS
from producers.generator import generate_export
from tests.e2e.harness import env_for, khala, ok
from tests.e2e.snapshot import Snapshot, table_snapshot

__all__ = [
    "PHASES",
    "Baseline",
    "MakeStages",
    "Phase",
    "Stage",
    "StageError",
    "Stages",
    "baseline",
    "create_database",
    "describe",
    "drop_database",
    "fresh_database",
    "generated_export",
    "latest_run",
    "run_counters",
    "run_phase",
    "stage_env",
]

Stage = Literal["process", "sink", "publish"]
Phase = Literal["none", "publishing", "published", "deriving", "derived", "applied"]
PHASES: tuple[Phase, ...] = ("none", "publishing", "published", "deriving", "derived", "applied")
"""An import run's life: registered, every document sent, claimed by a processor, derived
(its changes are all in the changes topic), applied by the sink."""
_TAIL_LINES = 25


class StageError(AssertionError):
    """A stage misbehaved (died, or a wait ran out); the message carries the stderr tails."""


@dataclass
class _Proc:
    stage: Stage
    index: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    killed: bool = False  # killed on purpose, not restarted yet
    handle: IO[bytes] | None = field(default=None, repr=False)


class Stages:
    """`process` and `sink` workers as subprocesses, plus the publisher.

    Use as a context manager or call `stop()` from a fixture finalizer: no process outlives it.
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        log_dir: Path,
        workers_process: int = 1,
        workers_sink: int = 1,
        verbose: bool = True,
        stage_args: dict[Stage, Sequence[str]] | None = None,
    ) -> None:
        self.env = dict(env)
        self._stage_args = dict(stage_args or {})  # extra flags of every worker of a stage
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._verbose = verbose
        self._procs: dict[tuple[Stage, int], _Proc] = {}
        workers: tuple[tuple[Stage, int], ...] = (
            ("process", workers_process),
            ("sink", workers_sink),
        )
        for stage, n in workers:
            for i in range(n):
                self._procs[(stage, i)] = _Proc(stage, i, self.log_dir / f"{stage}-{i}.log")
        self._publishes = 0
        self._initialised = False
        self.events: list[str] = []  # what the harness did, for assertion messages
        self.context = ""  # the case (seed and parameters), first line of every StageError

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Stages:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, init_db: bool = True) -> Stages:
        """Starts every worker that is not running; with `init_db`, the tables are created
        first, from here."""
        if init_db and not self._initialised:
            asyncio.run(_init_db(self.env["DATABASE_URL"]))
            self._note("tables created")
            self._initialised = True
        for proc in self._procs.values():
            if proc.stage != "publish" and (proc.popen is None or proc.popen.poll() is not None):
                self._spawn(proc, self._command(proc.stage, *self._stage_args.get(proc.stage, ())))
        return self

    def _command(self, stage: Stage, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "khala_app",
            *(["-v"] if self._verbose else []),
            stage,
            *args,
        ]

    def _spawn(self, proc: _Proc, command: list[str]) -> None:
        if proc.handle is not None:
            proc.handle.close()
        proc.handle = open(proc.log, "ab")  # noqa: SIM115 - closed in stop()
        line = f"--- {time.strftime('%H:%M:%S')} start #{proc.starts + 1}: {' '.join(command[2:])}"
        proc.handle.write(line.encode() + b"\n")
        proc.handle.flush()
        proc.popen = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=proc.handle,
            stderr=proc.handle,
        )
        proc.starts += 1
        proc.killed = False
        self._note(f"started {proc.stage}[{proc.index}] pid {proc.popen.pid}")

    def _note(self, event: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {event}")

    def _get(self, stage: Stage, index: int) -> _Proc:
        try:
            return self._procs[(stage, index)]
        except KeyError:
            raise StageError(f"no {stage}[{index}] in this harness") from None

    def kill(self, stage: Stage, index: int = 0) -> None:
        """SIGKILL, no clean-up of any kind (the crash under test)."""
        proc = self._get(stage, index)
        if proc.popen is None:
            raise StageError(f"{stage}[{index}] was never started")
        code = proc.popen.poll()
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGKILL)
            proc.popen.wait(timeout=30)
            self._note(f"SIGKILL {stage}[{index}] pid {proc.popen.pid}")
        else:
            self._note(f"{stage}[{index}] had already exited with {code} before the kill")
        proc.killed = True

    def restart(self, stage: Stage, index: int = 0) -> None:
        proc = self._get(stage, index)
        if proc.popen is not None and proc.popen.poll() is None:
            raise StageError(f"{stage}[{index}] is still running; kill it first")
        if stage == "publish":
            raise StageError("a publisher is not restarted: publish again (a new run)")
        self._spawn(proc, self._command(stage, *self._stage_args.get(stage, ())))

    def alive(self, stage: Stage, index: int = 0) -> bool:
        proc = self._get(stage, index)
        return proc.popen is not None and proc.popen.poll() is None

    def dead(self) -> list[str]:
        """Workers that exited without being killed by the test, with their exit codes."""
        return [
            f"{p.stage}[{p.index}] exited with {p.popen.returncode}"
            for p in self._procs.values()
            if p.stage != "publish"
            and p.popen is not None
            and not p.killed
            and p.popen.poll() is not None
        ]

    def revive(self) -> list[str]:
        """Restart every worker that has exited, as a service manager would (compose's
        `restart: unless-stopped`)."""
        revived = []
        for p in self._procs.values():
            if p.stage != "publish" and p.popen is not None and p.popen.poll() is not None:
                revived.append(f"{p.stage}[{p.index}] (exit {p.popen.returncode})")
                p.killed = True
                self._spawn(p, self._command(p.stage, *self._stage_args.get(p.stage, ())))
        return revived

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process, wait, then SIGKILL the ones left. Never raises."""
        running = [
            p for p in self._procs.values() if p.popen is not None and p.popen.poll() is None
        ]
        for p in running:
            assert p.popen is not None
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in running:
            assert p.popen is not None
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=10)
        for p in self._procs.values():
            if p.handle is not None:
                p.handle.close()
                p.handle = None

    # ------------------------------------------------------------------ publishing

    def start_publish(self, export: Path, *flags: str) -> None:
        """`publish --incremental EXPORT FLAGS` in the background (stage "publish", index n)."""
        index = self._publishes
        self._publishes += 1
        proc = _Proc("publish", index, self.log_dir / f"publish-{index}.log")
        self._procs[("publish", index)] = proc
        self._spawn(proc, self._command("publish", str(export), "--incremental", *flags))

    def wait_publish(self, index: int | None = None, timeout: float = 180.0) -> int:
        """Exit code of a background publisher (the newest one by default)."""
        proc = self._get("publish", self._publishes - 1 if index is None else index)
        assert proc.popen is not None
        try:
            return proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StageError(
                f"publish[{proc.index}] still running after {timeout:.0f}s\n{self.tails()}"
            ) from None

    def publish(self, export: Path, *flags: str, timeout: float = 180.0) -> int:
        """Runs `publish --incremental` to completion and fails unless it exits 0."""
        self.start_publish(export, *flags)
        index = self._publishes - 1
        code = self.wait_publish(index, timeout)
        if code != 0:
            raise StageError(f"publish[{index}] exited with {code}\n{self.tails()}")
        return index

    # ------------------------------------------------------------------ waiting

    def wait_applied(
        self,
        db_url: str,
        timeout: float = 120.0,
        *,
        revive: bool = False,
        run_id: int | None = None,
    ) -> import_runs.ImportRun:
        """Until the newest run (or `run_id`) is derived and applied by the sink.

        A worker that exits on its own fails the wait, unless `revive` restarts it.
        """
        prefix = self.env["KHALA_TOPIC_PREFIX"]
        deadline = time.monotonic() + timeout
        last: import_runs.ImportRun | None = None
        while True:
            dead = self.dead()
            if dead and revive:
                self._note("revived " + ", ".join(self.revive()))
            elif dead:
                raise StageError(f"{'; '.join(dead)} during the import\n{self.tails()}")
            try:
                last, done = asyncio.run(_applied(db_url, prefix, run_id))
            except Exception as exc:  # the database may be restarting under the test
                self._note(f"wait_applied: database not readable: {exc!r}"[:200])
                done = False
            if done:
                assert last is not None
                return last
            if time.monotonic() > deadline:
                state = "no run" if last is None else f"run {last.id} status {last.status!r}"
                raise StageError(
                    f"the import was not applied within {timeout:.0f}s ({state})\n{self.tails()}"
                )
            time.sleep(0.25)

    def wait_phase(
        self, db_url: str, target: Phase, *, after_run: int = 0, timeout: float = 120.0
    ) -> str:
        """Until the newest run with an id above `after_run` has reached `target` (in the
        order of `PHASES`); returns the phase it is in. Polls every 20 ms on one connection
        pool, so that a kill can be placed inside a phase that lasts a fraction of a second."""
        prefix = self.env["KHALA_TOPIC_PREFIX"]

        async def poll() -> tuple[Phase, bool]:
            engine = create_engine(db_url)
            found: Phase = "none"
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:
                    try:
                        found = await _phase_of(engine, prefix, after_run)
                    except Exception:  # no tables yet, or the database is restarting
                        await engine.dispose()
                        found = "none"
                    if PHASES.index(found) >= PHASES.index(target):
                        return found, True
                    if self.dead():
                        return found, False
                    await asyncio.sleep(0.02)
                return found, False
            finally:
                await engine.dispose()

        found, reached = asyncio.run(poll())
        if not reached:
            dead = "; ".join(self.dead())
            raise StageError(
                f"no run reached {target!r} within {timeout:.0f}s (at {found!r}) {dead}"
                f"\n{self.tails()}"
            )
        return found

    # ------------------------------------------------------------------ diagnostics

    def tails(self, lines: int = _TAIL_LINES) -> str:
        """The harness's own events, then the last lines of each process's output."""
        out = [f"case: {self.context}"] if self.context else []
        out += ["harness events:", *(f"  {e}" for e in self.events[-40:])]
        for p in self._procs.values():
            state = (
                "never started"
                if p.popen is None
                else "running"
                if p.popen.poll() is None
                else f"exit {p.popen.returncode}"
            )
            out.append(f"--- {p.stage}[{p.index}] ({state}, {p.starts} start(s)) {p.log}")
            try:
                text = p.log.read_text(errors="replace").splitlines()
            except OSError:
                text = ["(no log)"]
            out.extend(text[-lines:])
        return "\n".join(out)


async def _init_db(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        await init_db(engine)
    finally:
        await engine.dispose()


async def _applied(
    db_url: str, prefix: str, run_id: int | None
) -> tuple[import_runs.ImportRun | None, bool]:
    engine = create_engine(db_url)
    try:
        run = (
            await import_runs.latest(engine)
            if run_id is None
            else await import_runs.load(engine, run_id)
        )
        if run is None:
            return None, False
        done = await import_runs.applied_by_sink(engine, run, f"{prefix}.sink", f"{prefix}.changes")
        return run, done
    finally:
        await engine.dispose()


async def _phase(db_url: str, prefix: str, after_run: int) -> Phase:
    engine = create_engine(db_url)
    try:
        return await _phase_of(engine, prefix, after_run)
    finally:
        await engine.dispose()


async def _phase_of(engine: AsyncEngine, prefix: str, after_run: int) -> Phase:
    run = await import_runs.latest(engine)
    if run is None or run.id <= after_run:
        return "none"
    if run.status == "published":
        async with engine.connect() as conn:
            claim = await conn.scalar(sa.select(RUNS.c.claim).where(RUNS.c.id == run.id))
        return "deriving" if claim else "published"
    if await import_runs.applied_by_sink(engine, run, f"{prefix}.sink", f"{prefix}.changes"):
        return "applied"
    return run.status if run.status in PHASES else "none"  # type: ignore[return-value]


def run_phase(db_url: str, prefix: str) -> str:
    """The newest run's id and phase, for the record of where a kill landed."""
    try:
        run = latest_run(db_url)
        found = asyncio.run(_phase(db_url, prefix, 0))
    except Exception:  # no tables yet, or the database is down
        return "unknown"
    return f"run {run.id} {found}" if run is not None else found


def latest_run(db_url: str) -> import_runs.ImportRun | None:
    async def go() -> import_runs.ImportRun | None:
        engine = create_engine(db_url)
        try:
            return await import_runs.latest(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


# ---------------------------------------------------------------------- databases


async def _admin(admin_url: str, *statements: str) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(admin_url, timeout=30)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def create_database(admin_url: str) -> str:
    """A new empty database on the server of `admin_url`, as a SQLAlchemy asyncpg URL."""
    name = f"khala_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


def drop_database(admin_url: str, db_url: str) -> None:
    name = make_url(db_url).database
    with contextlib.suppress(Exception):
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    url = create_database(admin_url)
    try:
        yield url
    finally:
        drop_database(admin_url, url)


# ---------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class Baseline:
    snapshot: Snapshot
    counters: dict[str, int]
    """The last run's reference counters (the 22 lines, source_* excluded)."""
    seconds: float
    """How long the last `import-chat` of the sequence took (to place kills inside an import)."""


_BASELINES: dict[tuple[str, tuple[tuple[str, ...], ...]], Baseline] = {}
_EXPORTS: dict[tuple[Path, int, int], Path] = {}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generated_export(directory: Path, *, seed: int, users: int) -> Path:
    """`generate_export(users=, seed=, edge_cases=True)`, written once per session."""
    key = (directory, seed, users)
    found = _EXPORTS.get(key)
    if found is None or not found.exists():
        found = directory / f"export-s{seed}-u{users}.zip"
        generate_export(found, users=users, seed=seed, edge_cases=True)
        _EXPORTS[key] = found
    return found


def run_counters(run: import_runs.ImportRun | None) -> dict[str, int]:
    """A derived run's reference counters (those the processors compute)."""
    if run is None or run.summary is None:
        return {}
    counters = run.summary.counters
    return {k: counters.get(k, 0) for k in COUNTER_KEYS if not k.startswith("source_")}


def baseline(
    export: Path,
    *,
    kafka_bootstrap: str,
    pg_admin_url: str,
    imports: Sequence[Sequence[str]] = ((),),
) -> Baseline:
    """The tables after clean sequential `import-chat` runs of `export` on a fresh database.

    `imports` lists each run's extra flags, e.g. `((), ("--replace",))`. Cached per export
    content and sequence for the whole session (the PostgreSQL server is the session's).
    """
    key = (_sha256(export), tuple(tuple(f) for f in imports))
    cached = _BASELINES.get(key)
    if cached is not None:
        return cached
    prefix = f"base_{uuid.uuid4().hex[:8]}"
    seconds = 0.0
    with fresh_database(pg_admin_url) as url:
        env = env_for(kafka_bootstrap, prefix, url)
        for flags in imports:
            began = time.monotonic()
            ok(khala(["import-chat", str(export), *flags], env, timeout=300))
            seconds = time.monotonic() - began
        found = Baseline(table_snapshot(url), run_counters(latest_run(url)), seconds)
    _BASELINES[key] = found
    return found


def stage_env(
    kafka_bootstrap: str, topic_prefix: str, db_url: str, *, partitions: int = 3, lease_s: int = 2
) -> dict[str, str]:
    """Environment of a stage process: the test services, partition count and derive lease."""
    env = env_for(
        kafka_bootstrap,
        topic_prefix,
        db_url,
        KHALA_TOPIC_PARTITIONS=str(partitions),
        KHALA_DERIVE_LEASE_SECONDS=str(lease_s),
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def describe(seed: int, **params: Any) -> str:
    """The line that opens every assertion message: how to rerun this exact case."""
    extra = " ".join(f"{k}={v}" for k, v in params.items())
    return f"seed={seed} {extra}".strip()


MakeStages = Callable[..., Stages]
"""The `make_stages` fixture (tests/conftest.py): Stages(env, **workers) stopped after the test."""
