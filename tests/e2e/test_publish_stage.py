"""`publish` on its own is the publication of `import-chat` (khala_app/publication.py): it waits
out a broker that is away, gives up after the retry deadline like `import-chat` does, and holds
back while the processor group falls behind (here: no processor at all, which it notices and
stops waiting for, as `import-chat`'s publication does when `process` is not running)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from khala_stream.broker.local_broker import LocalBroker, start_local_broker
from khala_stream.db.importer_tables import RUNS
from producers.generator import GeneratedExport, generate_export
from tests.e2e.harness import env_for, khala, ok, run_db

WAITING_FOR_BROKER = re.compile(
    r"WARNING khala_stream\.runtime: waiting for the broker \(attempt \d+, retry in [\d.]+s\)"
)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> GeneratedExport:
    out = tmp_path_factory.mktemp("publish-export") / "export.zip"
    return generate_export(out, users=6, seed=5, threads_per_user=2, messages_per_thread=5)


def _statuses(db_url: str) -> list[str]:
    (found,) = run_db(db_url, [sa.select(RUNS.c.status).order_by(RUNS.c.id)])
    return [row.status for row in found]


def test_publish_waits_out_a_broker_that_is_away_and_then_publishes(
    export: GeneratedExport, own_broker: LocalBroker, sqlite_url: str, topic_prefix: str
) -> None:
    own_broker.stop()
    env = env_for(own_broker.bootstrap, topic_prefix, sqlite_url, KHALA_RETRY_DEADLINE_SECONDS="60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "khala_app", "publish", str(export.path), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    restarted: LocalBroker | None = None
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=4)  # without retries, the missing broker ends it at once
        assert proc.returncode is None, "publish gave up while the broker was away"
        restarted = start_local_broker(own_broker.data_dir, port=own_broker.port)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        if restarted is not None:
            restarted.stop()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err
    assert WAITING_FOR_BROKER.search(err), err
    result = orjson.loads(out)
    assert result["published"]["messages"] == export.counts["messages"]
    assert _statuses(sqlite_url) == ["published"]


def test_publish_gives_up_on_the_broker_after_the_deadline(
    export: GeneratedExport, own_broker: LocalBroker, sqlite_url: str, topic_prefix: str
) -> None:
    own_broker.stop()
    env = env_for(own_broker.bootstrap, topic_prefix, sqlite_url, KHALA_RETRY_DEADLINE_SECONDS="2")
    result = khala(["publish", str(export.path)], env, timeout=60)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert WAITING_FOR_BROKER.search(result.stderr), result.stderr
    assert re.search(
        r"^khala-stream: error: gave up waiting for the broker after \d+s: ", result.stderr, re.M
    ), result.stderr


def test_publish_holds_back_for_the_processor_group(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """More messages than the processor may be behind (publication.PROCESSOR_BEHIND): with no
    processor reading them, the publisher waits for its group, sees it make no progress, and
    goes on without it."""
    big = tmp_path / "big.zip"
    made = generate_export(big, users=10, seed=3, threads_per_user=2, messages_per_thread=800)
    from khala_app.publication import PROCESSOR_BEHIND

    assert made.counts["messages"] > PROCESSOR_BEHIND
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    result = ok(khala(["-v", "publish", str(big), "--json"], env, timeout=300))
    assert re.search(
        rf"INFO khala_stream\.backpressure: {re.escape(topic_prefix)}\.process made no progress"
        rf" on {re.escape(topic_prefix)}\.messages for \d+s; no longer waiting for it",
        result.stderr,
    ), result.stderr
    assert orjson.loads(result.stdout)["published"]["messages"] == made.counts["messages"]
    assert _statuses(sqlite_url) == ["published"]
