"""Issue #6, part 3: dependency outages during `import-chat` (SPEC §2 exit codes, README).

A database or broker that is unreachable is waited for with capped exponential backoff and
jitter, saying what is waited for; when it comes back the import resumes and ends exactly as
an uninterrupted one. After `--retry-deadline` seconds the import stops with exit 1, and a
rerun completes it.

Each test gets its own PostgreSQL server (`own_pg`) or its own broker, so that it can stop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from khala_stream.broker.clients import make_admin
from khala_stream.broker.local_broker import LocalBroker, start_local_broker
from khala_stream.config import KafkaSettings
from khala_stream.db.engine import create_engine
from producers.generator import generate_export
from tests.e2e.harness import CliResult, counts, env_for, khala, ok
from tests.e2e.snapshot import Snapshot, assert_same_tables, table_snapshot
from tests.fixtures.own_postgres import LocalPostgres

WAITING_FOR_DB = re.compile(
    r"WARNING khala_stream\.runtime: waiting for the database \(attempt \d+, retry in [\d.]+s\)"
)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that an import takes a few seconds, small enough to stay quick."""
    out = tmp_path_factory.mktemp("outage-export") / "export.zip"
    generate_export(out, users=25, seed=11, threads_per_user=3, messages_per_thread=12)
    return out


def _baseline_of(export: Path, kafka_bootstrap: str, base: Path) -> Snapshot:
    """The tables after an uninterrupted import (SQLite: the same rows as PostgreSQL)."""
    db_url = f"sqlite+aiosqlite:///{base}/khala.sqlite"
    ok(
        khala(
            ["import-chat", str(export)],
            env_for(kafka_bootstrap, f"b_{uuid.uuid4().hex[:8]}", db_url),
        )
    )
    return table_snapshot(db_url)


@pytest.fixture(scope="module")
def baseline(
    export: Path, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Snapshot:
    return _baseline_of(export, kafka_bootstrap, tmp_path_factory.mktemp("outage-baseline"))


@pytest.fixture(scope="module")
def long_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three times `export`: a processing phase long enough to stop the broker inside it."""
    out = tmp_path_factory.mktemp("outage-long-export") / "export.zip"
    generate_export(out, users=75, seed=12, threads_per_user=3, messages_per_thread=12)
    return out


@pytest.fixture(scope="module")
def long_baseline(
    long_export: Path, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Snapshot:
    return _baseline_of(long_export, kafka_bootstrap, tmp_path_factory.mktemp("long-baseline"))


def scalar(db_url: str, sql: str) -> int | None:
    """One number from the database, or None while it is unreachable or the table missing."""

    async def go() -> int | None:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                return int(await conn.scalar(sa.text(sql)) or 0)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    except Exception:
        return None


def wait_until(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[str], limit: float
) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"import ended (exit {proc.returncode}) before {what}:\n{out}{err}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {limit}s")
        time.sleep(0.05)


def start_import(export: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "khala_app", "import-chat", str(export), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The import process never outlives its test."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)


def keeps_waiting(proc: subprocess.Popen[str], seconds: float) -> None:
    """The import must still be running `seconds` from now (waiting, not failing)."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return
    out, err = proc.communicate()
    raise AssertionError(
        f"the import gave up during the outage (exit {proc.returncode}):\n{out}{err}"
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> CliResult:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(
            f"the import did not end within {timeout}s:\n{out}{err[-20000:]}"
        ) from None
    return CliResult(proc.returncode, out, err)


# --------------------------------------------------------------------------- the database


def test_database_down_at_start_exits_1_after_the_deadline_and_writes_nothing(
    export: Path, own_pg: LocalPostgres, kafka_bootstrap: str, topic_prefix: str
) -> None:
    db_url = own_pg.create_database()
    own_pg.stop()
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    started = time.monotonic()
    result = khala(["import-chat", str(export), "--retry-deadline", "3"], env, timeout=60)
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.stdout + result.stderr
    assert 3 <= elapsed < 30
    assert "Traceback" not in result.stderr
    assert WAITING_FOR_DB.search(result.stderr), result.stderr
    assert re.search(
        r"^khala-stream: error: gave up waiting for the database after \d+s: .*(refused|connect)",
        result.stderr,
        re.M | re.I,
    ), result.stderr
    assert result.stdout == ""
    # Backoff: a handful of attempts in 3 s, not a busy loop.
    attempts = len(WAITING_FOR_DB.findall(result.stderr))
    assert 2 <= attempts <= 40, attempts
    own_pg.start()
    assert scalar(db_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    assert topics_with_prefix(kafka_bootstrap, topic_prefix) == set()


PHASES = {
    # stop the database as soon as ...
    "publishing": "SELECT count(*) FROM khala_import_runs",
    "processing": "SELECT count(*) FROM khala_import_documents",
    # the derivation has begun: its rows are being written (of the longer export: a small
    # one is derived and written faster than the database stops)
    "sinking": "SELECT count(*) FROM khala_import_runs WHERE claim IS NOT NULL",
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_database_outage_mid_import_is_waited_out(
    phase: str,
    request: pytest.FixtureRequest,
    own_pg: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    long = phase == "sinking"
    export: Path = request.getfixturevalue("long_export" if long else "export")
    baseline: Snapshot = request.getfixturevalue("long_baseline" if long else "baseline")
    db_url = own_pg.create_database()
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    with reaped(start_import(export, env, "--retry-deadline", "60")) as proc:
        wait_until(f"the {phase} phase", lambda: (scalar(db_url, PHASES[phase]) or 0) > 0, proc, 60)
        own_pg.stop()
        keeps_waiting(proc, 4)
        own_pg.start()
        result = finish(proc, timeout=120)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert WAITING_FOR_DB.search(result.stderr), result.stderr
    assert "Import completed successfully." in result.stdout
    assert_same_tables(baseline, table_snapshot(db_url), f"database stopped while {phase}")


def _fail_mid_import(
    export: Path, own_pg: LocalPostgres, env: dict[str, str], db_url: str
) -> CliResult:
    """Stop the database while the processor works, for longer than a 3 s deadline."""
    with reaped(start_import(export, env, "--retry-deadline", "3")) as proc:
        wait_until(
            "the processing phase",
            lambda: (scalar(db_url, PHASES["processing"]) or 0) > 0,
            proc,
            60,
        )
        own_pg.stop()
        failed = finish(proc, timeout=60)
    own_pg.start()
    return failed


def test_after_a_failure_mid_import_a_rerun_completes(
    export: Path,
    baseline: Snapshot,
    own_pg: LocalPostgres,
    kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    db_url = own_pg.create_database()
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    failed = _fail_mid_import(export, own_pg, env, db_url)
    assert failed.exit_code == 1, failed.stdout + failed.stderr
    assert "Import completed successfully." not in failed.stdout
    rerun = ok(khala(["import-chat", str(export)], env))
    assert "Import completed successfully." in rerun.stdout
    assert_same_tables(baseline, table_snapshot(db_url), "rerun after a failed import")


def test_a_deadline_failure_mid_import_says_what_it_waited_for(
    export: Path, own_pg: LocalPostgres, kafka_bootstrap: str, topic_prefix: str
) -> None:
    db_url = own_pg.create_database()
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    failed = _fail_mid_import(export, own_pg, env, db_url)
    assert failed.exit_code == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr, failed.stderr
    assert re.search(
        r"^khala-stream: error: gave up waiting for the database after \d+s", failed.stderr, re.M
    ), failed.stderr


# --------------------------------------------------------------------------- the broker


def topics_with_prefix(bootstrap: str, prefix: str) -> set[str]:
    async def go() -> set[str]:
        admin = make_admin(KafkaSettings(bootstrap_servers=bootstrap))
        await admin.start()
        try:
            return {t for t in await admin.list_topics() if t.startswith(prefix + ".")}
        finally:
            await admin.close()

    return asyncio.run(go())


def test_broker_down_exits_1_within_the_deadline(
    export: Path, own_broker: LocalBroker, sqlite_url: str, topic_prefix: str
) -> None:
    own_broker.stop()
    env = env_for(own_broker.bootstrap, topic_prefix, sqlite_url)
    started = time.monotonic()
    result = khala(["import-chat", str(export), "--retry-deadline", "3"], env, timeout=60)
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.stdout + result.stderr
    assert 3 <= elapsed < 30
    assert "Traceback" not in result.stderr
    assert re.search(
        r"WARNING khala_stream\.runtime: waiting for the broker \(attempt \d+, retry in [\d.]+s\)",
        result.stderr,
    ), result.stderr
    assert re.search(
        r"^khala-stream: error: gave up waiting for the broker after \d+s: ", result.stderr, re.M
    ), result.stderr
    assert counts(sqlite_url)["users"] == 0


# Every document acknowledged, the run not derived yet: its changes must still pass through
# the broker. (A broker that loses acknowledged documents while they are being published is
# reported and the rerun completes the import: test_broker_loss.py.)
STILL_PROCESSING = "SELECT count(*) FROM khala_import_runs WHERE status = 'published'"


def test_broker_restart_mid_import_is_waited_out(
    long_export: Path,
    long_baseline: Snapshot,
    own_broker: LocalBroker,
    sqlite_url: str,
    topic_prefix: str,
) -> None:
    env = env_for(own_broker.bootstrap, topic_prefix, sqlite_url)
    env["KHALA_VERBOSITY"] = "1"  # what each stage did, should the import not end
    with reaped(start_import(long_export, env, "--retry-deadline", "60")) as proc:
        wait_until(
            "the processing phase",
            lambda: (scalar(sqlite_url, STILL_PROCESSING) or 0) > 0,
            proc,
            60,
        )
        own_broker.stop()
        keeps_waiting(proc, 3)
        restarted = start_local_broker(own_broker.data_dir, port=own_broker.port)
        try:
            result = finish(proc, timeout=120)
        finally:
            restarted.stop()
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert_same_tables(long_baseline, table_snapshot(sqlite_url), "broker restarted mid-import")
