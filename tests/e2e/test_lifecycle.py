"""Issue 21, process lifecycle: a signal to a command's pid stops it and all it started.

Each command runs as an OS process with a marker in its environment, which every process it
starts inherits (stage children, the embedded broker's keeper, noida-db): scanning
/proc/*/environ for it finds whatever the product left running. A census thread samples the
noida-db processes during each test and records the most that ever ran on one data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from khala_stream.db.engine import create_engine
from producers.generator import generate_export
from tests.e2e.harness import CliResult, env_for, khala, ok
from tests.e2e.snapshot import Snapshot, assert_same_tables, table_snapshot

MARKER = "KHALA_LIFECYCLE_TEST"
LIMIT_S = 120.0  # a generous bound on every wait: these tests assert outcomes, not speed


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Long enough that an import is caught in the middle of its derivation."""
    out = tmp_path_factory.mktemp("lifecycle-export") / "export.zip"
    generate_export(out, users=60, seed=21, threads_per_user=3, messages_per_thread=12)
    return out


@pytest.fixture(scope="module")
def baseline(
    export: Path, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Snapshot:
    """The ten tables after an uninterrupted import (SQLite holds the same rows as PostgreSQL)."""
    base = tmp_path_factory.mktemp("lifecycle-baseline")
    db_url = f"sqlite+aiosqlite:///{base}/khala.sqlite"
    env = env_for(kafka_bootstrap, f"b_{uuid.uuid4().hex[:8]}", db_url)
    ok(khala(["import-chat", str(export)], env, timeout=LIMIT_S * 2))
    return table_snapshot(db_url)


# --------------------------------------------------------------------------- processes


def product_processes(mark: str) -> dict[int, str]:
    """pid → command line of every live process whose environment holds the test's marker."""
    wanted = f"{MARKER}={mark}".encode()
    found: dict[int, str] = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted in environ.read_bytes().split(b"\0"):
                cmdline = (environ.parent / "cmdline").read_bytes()
                found[int(environ.parent.name)] = cmdline.replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    found.pop(os.getpid(), None)
    return found


def brokers_by_data_dir() -> Counter[str]:
    """How many noida-db processes run on each data folder, right now."""
    running: Counter[str] = Counter()
    for cmdline_path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline_path.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"noida-db") and b"--data-dir" in args:
            running[args[args.index(b"--data-dir") + 1].decode()] += 1
    return running


class BrokerCensus:
    """Samples the noida-db processes in a thread; `most` is the peak count per data folder."""

    def __init__(self) -> None:
        self.most: Counter[str] = Counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            for data_dir, n in brokers_by_data_dir().items():
                self.most[data_dir] = max(self.most[data_dir], n)
            time.sleep(0.02)

    def __enter__(self) -> BrokerCensus:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def assert_never_two(self) -> None:
        assert self.most, "the census saw no broker at all"
        twice = {d: n for d, n in self.most.items() if n > 1}
        assert not twice, f"two brokers ran on one data folder at once: {twice}"


@pytest.fixture
def census() -> Iterator[BrokerCensus]:
    with BrokerCensus() as running:
        yield running


@pytest.fixture
def mark() -> Iterator[str]:
    """This test's marker; whatever still carries it when the test ends is killed."""
    value = uuid.uuid4().hex
    yield value
    for pid in product_processes(value):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start(
    args: list[str],
    env: dict[str, str],
    cwd: Path,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.Popen[str]:
    """A command in a session of its own: a signal to its pid reaches it alone."""
    return subprocess.Popen(
        [sys.executable, "-m", "khala_app", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )


def stop(proc: subprocess.Popen[str], signum: int) -> CliResult:
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=LIMIT_S)
    return CliResult(proc.returncode, out, err)


def wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended (exit {proc.returncode}) before {what}:\n{out}{err}")
        assert time.monotonic() < deadline, f"no {what} within {LIMIT_S}s"
        time.sleep(0.05)


def brokers(mark: str) -> list[int]:
    """The pids of the test's noida-db processes."""
    return [pid for pid, cmdline in product_processes(mark).items() if "noida-db" in cmdline]


def wait_until_gone(mark: str) -> None:
    """Orphans of a killed command stop by themselves: the broker after its idle time."""
    deadline = time.monotonic() + LIMIT_S
    while product_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert product_processes(mark) == {}


def count(db_url: str, sql: str) -> int:
    """One number from the database; 0 while the table does not exist yet."""

    async def go() -> int:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                return int(await conn.scalar(sa.text(sql)) or 0)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    except sa.exc.ProgrammingError:  # the importer's tables are not created yet
        return 0


PROCESSING = "SELECT count(*) FROM khala_import_documents"
DERIVING = "SELECT count(*) FROM khala_import_runs WHERE claim IS NOT NULL AND status = 'published'"


def environment(
    mark: str, db_url: str, kafka_bootstrap: str | None, home: Path, **extra: str
) -> dict[str, str]:
    """The command's environment; without `kafka_bootstrap`, the embedded broker in `home`."""
    env = env_for(kafka_bootstrap or "", f"t_{uuid.uuid4().hex[:8]}", db_url, **extra)
    if kafka_bootstrap is None:
        del env["KAFKA_BOOTSTRAP_SERVERS"]
    env[MARKER] = mark
    env["KHALA_BROKER_HOME"] = str(home)
    return env


def rerun_matches(export: Path, env: dict[str, str], cwd: Path, baseline: Snapshot) -> None:
    rerun = ok(khala(["import-chat", str(export)], env, cwd=cwd, timeout=LIMIT_S * 2))
    assert "Traceback" not in rerun.stderr
    assert_same_tables(table_snapshot(env["DATABASE_URL"]), baseline)


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("broker", ["embedded", "external"])
def test_sigterm_to_import_chat_stops_it_and_everything_it_started(
    broker: str,
    export: Path,
    baseline: Snapshot,
    kafka_bootstrap: str,
    pg_url: str,
    mark: str,
    census: BrokerCensus,
    tmp_path: Path,
) -> None:
    bootstrap = None if broker == "embedded" else kafka_bootstrap
    env = environment(mark, pg_url, bootstrap, tmp_path / "home")
    proc = start(["import-chat", str(export), "--replace"], env, tmp_path)
    wait_for("documents in the store", lambda: count(pg_url, PROCESSING) > 0, proc)
    started = set(product_processes(mark))
    assert len(started) >= 3, started  # the command and its two stage children at least

    result = stop(proc, signal.SIGTERM)

    assert result.exit_code == 143, result.stderr
    assert "khala-stream: stopped by SIGTERM" in result.stderr
    assert "Traceback" not in result.stderr
    assert product_processes(mark) == {}
    rerun_matches(export, env, tmp_path, baseline)
    assert product_processes(mark) == {}
    if broker == "embedded":
        census.assert_never_two()


def test_sigkill_to_import_chat_alone_leaves_nothing_running_for_long(
    export: Path,
    baseline: Snapshot,
    pg_url: str,
    mark: str,
    census: BrokerCensus,
    tmp_path: Path,
) -> None:
    # A short idle time, so that the orphaned broker's watchdog is seen to act.
    env = environment(mark, pg_url, None, tmp_path / "home", KHALA_BROKER_IDLE_SECONDS="5")
    proc = start(["import-chat", str(export)], env, tmp_path)
    wait_for("documents in the store", lambda: count(pg_url, PROCESSING) > 0, proc)
    commands = "\n".join(product_processes(mark).values())
    assert "khala_app process" in commands and "noida-db" in commands, commands

    result = stop(proc, signal.SIGKILL)

    assert result.exit_code == -signal.SIGKILL
    wait_until_gone(mark)
    rerun_matches(export, env, tmp_path, baseline)
    assert product_processes(mark) == {}
    census.assert_never_two()


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],  # SIGHUP: was killed
    ids=["SIGTERM", "SIGINT", "SIGHUP"],  # outright, its broker left to idle out
)
def test_a_signal_to_lag_watch_stops_it_and_its_broker(
    signum: int, code: int, sqlite_url: str, mark: str, census: BrokerCensus, tmp_path: Path
) -> None:
    env = environment(mark, sqlite_url, None, tmp_path / "home")
    # Started as from a terminal, even when the tests themselves run under nohup.
    proc = start(["lag", "--watch", "--json", "--interval", "0.2"], env, tmp_path, _hangup_kills)
    wait_for("a broker", lambda: bool(brokers(mark)), proc)

    result = stop(proc, signum)

    assert result.exit_code == code, result.stderr
    assert "Traceback" not in result.stderr
    assert product_processes(mark) == {}
    census.assert_never_two()


def _as_nohup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does before it starts a command


def _hangup_kills() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # what a shell started from a terminal has


def test_a_command_started_under_nohup_outlives_a_hangup(
    sqlite_url: str, mark: str, tmp_path: Path
) -> None:
    env = environment(mark, sqlite_url, None, tmp_path / "home")
    proc = start(["lag", "--watch", "--json", "--interval", "0.2"], env, tmp_path, _as_nohup)
    wait_for("a broker", lambda: bool(brokers(mark)), proc)
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert proc.poll() is None, proc.communicate()

    result = stop(proc, signal.SIGTERM)

    assert result.exit_code == 143, result.stderr
    assert product_processes(mark) == {}


def test_sigterm_to_a_process_service_in_the_middle_of_a_derivation(
    export: Path,
    baseline: Snapshot,
    kafka_bootstrap: str,
    pg_url: str,
    mark: str,
    tmp_path: Path,
) -> None:
    env = environment(mark, pg_url, kafka_bootstrap, tmp_path / "home")
    ok(khala(["publish", str(export)], env, cwd=tmp_path, timeout=LIMIT_S))
    proc = start(["process"], env, tmp_path)
    wait_for("a derivation under way", lambda: count(pg_url, DERIVING) > 0, proc)

    result = stop(proc, signal.SIGTERM)

    # 0: it reached its batch boundary in time; 143: it was cancelled there and then.
    assert result.exit_code in (0, 143), result.stderr
    assert "Traceback" not in result.stderr
    assert product_processes(mark) == {}
    rerun_matches(export, env, tmp_path, baseline)
    assert product_processes(mark) == {}


def test_a_second_command_reuses_the_running_broker(
    export: Path,
    baseline: Snapshot,
    pg_url: str,
    mark: str,
    census: BrokerCensus,
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    env = environment(mark, pg_url, None, home)
    watch = start(["lag", "--watch", "--json", "--interval", "0.5"], env, tmp_path)
    wait_for("a broker", lambda: bool(brokers(mark)), watch)
    first = brokers(mark)

    rerun_matches(export, env, tmp_path, baseline)  # an import while the watch runs

    assert brokers(mark) == first  # the same broker: the import used it and left it running
    result = stop(watch, signal.SIGTERM)
    assert result.exit_code == 143, result.stderr
    assert product_processes(mark) == {}
    census.assert_never_two()
    assert census.most[str((home / "broker" / "data").resolve())] == 1


def first_line(proc: subprocess.Popen[str]) -> str:
    """The command's first line of output, read in a thread so that the wait is bounded."""
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(LIMIT_S)
    assert lines and lines[0], f"no output from {proc.args}"
    return lines[0]


def test_commands_started_together_share_one_broker_until_the_last_leaves(
    sqlite_url: str, mark: str, census: BrokerCensus, tmp_path: Path
) -> None:
    env = environment(mark, sqlite_url, None, tmp_path / "home")
    watches = [
        start(["lag", "--watch", "--json", "--interval", "0.5"], env, tmp_path) for _ in range(3)
    ]
    for watch in watches:
        first_line(watch)  # a sample: this one reached the broker
    (broker,) = brokers(mark)

    for watch in watches[:-1]:
        assert stop(watch, signal.SIGTERM).exit_code == 143
        assert brokers(mark) == [broker]  # still in use by the last one
    assert stop(watches[-1], signal.SIGTERM).exit_code == 143
    assert product_processes(mark) == {}
    census.assert_never_two()


def test_the_broker_dies_with_its_keeper_and_the_next_command_starts_another(
    sqlite_url: str, mark: str, census: BrokerCensus, tmp_path: Path
) -> None:
    env = environment(mark, sqlite_url, None, tmp_path / "home")
    watch = start(["lag", "--watch", "--json", "--interval", "0.5"], env, tmp_path)
    first_line(watch)
    (keeper,) = [p for p, c in product_processes(mark).items() if "broker.keeper" in c]
    assert len(brokers(mark)) == 1

    os.kill(keeper, signal.SIGKILL)
    wait_for("the broker to stop", lambda: brokers(mark) == [], watch)

    ok(khala(["lag", "--json"], env, cwd=tmp_path, timeout=LIMIT_S))  # starts a new broker
    assert stop(watch, signal.SIGTERM).exit_code == 143
    assert product_processes(mark) == {}
    census.assert_never_two()
