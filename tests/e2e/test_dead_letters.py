"""Dead letters (SPEC §3.2): a row the database refuses is set aside with its provenance while
the rest of its batch is written, and `dlq replay` applies it once the cause is fixed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import sqlalchemy as sa

from khala_stream.broker.clients import make_producer
from khala_stream.config import KafkaSettings
from khala_stream.contract import RowChange, Topics
from khala_stream.contract.codec import encode_change
from khala_stream.dead_letters import publish_dead_letters, read_dead_letters
from producers.generator import load_reference_fixture, write_fixture_zip
from tests.e2e.harness import counts, env_for, khala, ok, run_db

LONG_ID = "m" * 40  # messages.id is varchar(36)


def test_refused_row_is_set_aside_then_replayed_after_the_fix(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    tables = load_reference_fixture("fixture-a")
    tables["messages"].append(
        {
            "_id": "messages:long",
            "threadId": "11111111-1111-1111-1111-111111111111",
            "messageId": LONG_ID,
            "role": "assistant",
            "text": "too long an id",
            "createdAtMs": 1735700021000,
        }
    )
    export = tmp_path / "long-id.zip"
    write_fixture_zip(export, tables)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    result = ok(khala(["import-chat", str(export)], env))
    assert "rows refused by the database: 2" in result.stdout
    assert "value too long for type character varying(36)" in result.stdout
    assert result.counters["messages_imported"] == 3  # refused rows still count (SPEC §8.12)
    assert counts(pg_url)["messages"] == 2  # the rest of the batch was written

    # A sink batch that rolls back after publishing its letters publishes them again when it
    # is applied: a second copy of a letter is listed and replayed as one.
    asyncio.run(_publish_a_copy(kafka_bootstrap, topic_prefix))
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"db_refused": 2}
    letter = listed["letters"][0]
    assert letter["location"] == "messages/documents.jsonl:3"
    assert letter["doc_id"] == LONG_ID
    assert letter["stage"] == "sink" and letter["run_id"] == 1
    assert len(letter["export_sha256"]) == 64

    still = khala(["dlq", "replay", "--json"], env)
    assert still.exit_code == 1  # nothing fixed yet: still refused, still listed
    assert orjson.loads(still.stdout)["applied"] == 0

    run_db(
        pg_url,
        [
            sa.text("ALTER TABLE messages ALTER COLUMN id TYPE varchar(64)"),
            sa.text("ALTER TABLE agent_conversation_messages ALTER COLUMN id TYPE varchar(64)"),
        ],
    )
    replayed = orjson.loads(ok(khala(["dlq", "replay", "--json"], env)).stdout)
    assert replayed == {"retried": 2, "applied": 2, "still_refused": [], "not_retryable": 0}
    (found,) = run_db(pg_url, [sa.text(f"SELECT content FROM messages WHERE id = '{LONG_ID}'")])
    assert found[0][0] == "too long an id"
    assert counts(pg_url)["agent_conversation_messages"] == 3
    assert orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)["total"] == 0


async def _publish_a_copy(bootstrap: str, prefix: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    topic = Topics(prefix).dead_letters
    first = (await read_dead_letters(kafka, topic))[0]
    producer = make_producer(kafka)
    await producer.start()
    try:
        await publish_dead_letters(producer, topic, [first.letter])
    finally:
        await producer.stop()
    assert len(await read_dead_letters(kafka, topic)) == 3


def test_a_refused_row_on_sqlite_is_set_aside_without_stalling_the_sink(
    kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """On SQLite the sink's transaction holds the database's one write lock while it sets a
    refused row aside: what the dead letter needs from the database is read before it."""
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url, KHALA_RETRY_DEADLINE_SECONDS="20")
    ok(khala(["sink", "--until-idle"], env))  # binds the topics to this database
    row = {"user_id": 1, "title": "Kept", "created_at": "2024-01-02 03:04:05"}
    good = RowChange(run_id=1, table="threads", op="upsert", key="t1", values=row, row_hash="h")
    # A column the table has, a value the database refuses (an unknown column is not refused
    # by the database: the sink sets its whole record aside, tests/e2e/test_poison_records.py).
    bad = RowChange(
        run_id=1, table="threads", op="upsert", key="t2", values={**row, "user_id": None}
    )

    async def send() -> None:
        producer = make_producer(KafkaSettings(bootstrap_servers=kafka_bootstrap))
        await producer.start()
        try:
            value = b"[" + b",".join(encode_change(c) for c in (good, bad)) + b"]"
            await producer.send_and_wait(Topics(topic_prefix).changes, value, partition=0)
        finally:
            await producer.stop()

    asyncio.run(send())
    ok(khala(["sink", "--until-idle"], env, timeout=60))
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"db_refused": 1}
    assert "NOT NULL constraint failed: threads.user_id" in listed["letters"][0]["reason"]
    assert run_db(sqlite_url, [sa.text("SELECT id, title FROM threads")])[0] == [("t1", "Kept")]
