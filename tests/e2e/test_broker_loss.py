"""A broker that loses records it had acknowledged: the import still ends with every row.

noida-db (the embedded default) loses the last writes it acknowledged while a SIGTERM stop was
under way, and a new, empty broker in place of the old one loses everything. Both are shown
here by deleting and re-creating the changes topic, which is deterministic: the processor
derives the latest run again when its acknowledged changes are gone
(`Processor._derive_lost_again`), pads the log up to what the sink had read before sending new
changes (`Processor._cover_lost_offsets`), and a consumer whose stored position lies beyond the
end of the log reads it again from the start instead of refusing every batch
(`runtime.seek_to_stored`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from khala_stream.broker.clients import ensure_topics, make_admin
from khala_stream.config import KafkaSettings
from khala_stream.contract.topics import Topics
from producers.generator import generate_export
from tests.e2e.harness import counts, env_for, khala, ok, run_db
from tests.e2e.snapshot import assert_same_tables, table_snapshot

LOST = "the broker lost changes it had acknowledged"
SHORTER = "the changes topic is shorter than what was read from it"


def _lose_the_changes(bootstrap: str, prefix: str) -> None:
    _lose_topic(bootstrap, Topics(prefix).changes)


def _lose_topic(bootstrap: str, topic: str) -> None:
    """Delete `topic` and create it again, empty."""

    async def go() -> None:
        kafka = KafkaSettings(bootstrap_servers=bootstrap)
        admin = make_admin(kafka)
        await admin.start()
        try:
            await admin.delete_topics([topic])
            async with asyncio.timeout(30):
                while topic in await admin.list_topics():
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()
        await ensure_topics(kafka, [topic])

    asyncio.run(go())


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("loss-exports")
    older, newer = base / "older.zip", base / "newer.zip"
    generate_export(older, users=5, seed=31)
    generate_export(newer, users=7, seed=32)
    return older, newer


def _baseline(bootstrap: str, tmp_path: Path, *paths: Path) -> dict[str, list[tuple[object, ...]]]:
    """The tables after importing `paths` in order with nothing lost."""
    db_url = f"sqlite+aiosqlite:///{tmp_path}/baseline.sqlite"
    env = env_for(bootstrap, f"b_{uuid.uuid4().hex[:8]}", db_url)
    for path in paths:
        ok(khala(["import-chat", str(path)], env))
    return table_snapshot(db_url)


def test_changes_lost_before_the_sink_read_them_are_derived_again(
    exports: tuple[Path, Path], tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    older, _ = exports
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["publish", str(older)], env))
    ok(khala(["process", "--until-idle"], env))  # derived; no sink has read a change yet
    _lose_the_changes(kafka_bootstrap, topic_prefix)

    again = ok(khala(["process", "--until-idle"], env))
    assert LOST in again.stderr, again.stderr
    ok(khala(["sink", "--until-idle"], env))

    assert counts(pg_url)["users"] > 0
    assert_same_tables(
        _baseline(kafka_bootstrap, tmp_path, older), table_snapshot(pg_url), "changes lost"
    )


def test_changes_sent_after_a_loss_land_beyond_what_the_sink_had_read(
    exports: tuple[Path, Path], tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    older, newer = exports
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(older)], env))
    _lose_the_changes(kafka_bootstrap, topic_prefix)  # the sink had read past the new end

    result = ok(khala(["import-chat", str(newer)], env))

    assert SHORTER in result.stderr, result.stderr
    assert_same_tables(
        _baseline(kafka_bootstrap, tmp_path, older, newer),
        table_snapshot(pg_url),
        "changes topic replaced between two imports",
    )


def test_a_sink_whose_position_lies_beyond_the_end_of_the_log_reads_it_again(
    exports: tuple[Path, Path], tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    older, newer = exports
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(older)], env))
    _lose_the_changes(kafka_bootstrap, topic_prefix)

    alone = ok(khala(["sink", "--until-idle"], env))  # nothing to read, and no batch refused
    assert "beyond end" in alone.stderr, alone.stderr
    ok(khala(["import-chat", str(newer)], env))

    assert_same_tables(
        _baseline(kafka_bootstrap, tmp_path, older, newer),
        table_snapshot(pg_url),
        "sink started on a changes topic shorter than its stored positions",
    )


def _stage_pid(parent: int, name: str, limit_s: float = 30) -> int:
    """The pid of the `name` stage that `import-chat` (pid `parent`) started."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if name.encode() in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                    return int(child)
        time.sleep(0.005)
    raise AssertionError(f"import-chat started no {name} stage within {limit_s}s")


def _published(db_url: str) -> bool:
    statuses = run_db(db_url, [sa.text("SELECT status FROM khala_import_runs")])[0]
    return [s for (s,) in statuses] == ["published"]


def test_documents_lost_after_they_were_published_are_published_again(
    exports: tuple[Path, Path], tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    older, _ = exports
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "khala_app", "import-chat", str(older)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        processor = _stage_pid(proc.pid, "process")
        os.kill(processor, signal.SIGSTOP)  # frozen before it has read a document
        deadline = time.monotonic() + 60
        while not _published(pg_url):
            assert time.monotonic() < deadline, "the export was not published within 60s"
            time.sleep(0.1)
        _lose_topic(kafka_bootstrap, Topics(topic_prefix).source("messages"))
        os.kill(processor, signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)

    assert proc.returncode == 0, out + err
    assert "the broker lost documents it had acknowledged" in err, err
    assert "Import completed successfully." in out
    assert_same_tables(
        _baseline(kafka_bootstrap, tmp_path, older), table_snapshot(pg_url), "documents lost"
    )
