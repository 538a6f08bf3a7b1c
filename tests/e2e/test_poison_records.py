"""Poison records and forged changes (issue 21, item 5): a record a stage cannot decode, or a
change the sink must not apply, is set aside in the dead-letter topic with its raw bytes, topic,
partition, offset and reason; the stage moves past it and goes on, and no table is touched.

The records are written by a plain producer, as anyone with write access to the topics could.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from khala_stream.broker.clients import make_producer
from khala_stream.config import KafkaSettings
from khala_stream.contract import Topics
from khala_stream.contract.documents import Provenance, document_headers
from khala_stream.dead_letters import StoredDeadLetter, read_dead_letters
from producers.generator import load_reference_fixture, write_fixture_zip
from tests.e2e.harness import counts, env_for, khala, ok, run_db
from tests.e2e.snapshot import assert_same_tables, table_snapshot

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Poison:
    value: bytes | None
    code: str  # the dead letter's reason code
    reason: str  # a part of its reason
    headers: Headers | None = None
    key: bytes | None = None


@dataclass(frozen=True)
class Sent:
    poison: Poison
    topic: str
    partition: int
    offset: int


def _change(table: str, op: str, key: str = "", **values: Any) -> dict[str, Any]:
    return {"v": 1, "run": 1, "table": table, "op": op, "key": key, "values": values, "hash": None}


def _changes(*changes: dict[str, Any]) -> bytes:
    return orjson.dumps(list(changes))


def _row_batch(table: str, columns: str, run: bytes | None = b"1") -> Headers:
    headers = [("khala-rows", table.encode()), ("khala-columns", columns.encode())]
    return headers + ([("khala-run", run)] if run is not None else [])


THREAD = "11111111-1111-1111-1111-111111111111"  # a thread of fixture-a
GOOD_ROW = {"user_id": 1, "title": "Applied after the poison", "created_at": "2025-01-01 00:00:00"}

CHANGES_POISON = [
    Poison(b"\x00\xffnot json at all", "undecodable_record", "not JSON"),
    Poison(b'{"run": 1}', "undecodable_record", "not a JSON array"),
    Poison(
        orjson.dumps([{**_change("threads", "delete", THREAD), "run": "one"}]),
        "undecodable_record",
        "is not a run id",
    ),
    Poison(b"[[1, 2]]", "undecodable_record", "a change is not a JSON object"),
    Poison(b"garbage", "undecodable_record", "not JSON", _row_batch("threads", "id,title")),
    Poison(b"[]", "undecodable_record", "without its khala-run", _row_batch("threads", "id", None)),
    Poison(
        b'[{"id": "x", "title": "t", "_k": "x", "_h": "h", "_s": ["threads", 1, null]}]',
        "undecodable_record",
        "not an object of the batch's columns",
        _row_batch("threads", "id"),
    ),
    Poison(_changes(_change("users", "truncate")), "forbidden_change", "truncate of users refused"),
    Poison(
        _changes(_change("migrations", "truncate")),
        "forbidden_change",
        "table 'migrations' is not one of the ten",
    ),
    Poison(
        _changes(_change("secrets", "delete", "1")),
        "forbidden_change",
        "table 'secrets' is not one of the ten",
    ),
    # A record holding one forged change is not trusted for the others: the delete of a real
    # thread before it is not applied either.
    Poison(
        _changes(_change("threads", "delete", THREAD), _change("threads", "drop", THREAD)),
        "forbidden_change",
        "unknown operation 'drop'",
    ),
    Poison(
        _changes(_change("threads", "update", THREAD, colour="red")),
        "forbidden_change",
        "unknown column threads.colour",
    ),
    Poison(
        _changes(_change("autopilots", "truncate")),
        "forbidden_change",
        "truncate of autopilots refused",
    ),
    Poison(
        b'[{"id": 1, "migration": "x", "_k": "1", "_h": "h", "_s": ["users", 1, null]}]',
        "forbidden_change",
        "table 'migrations' is not one of the ten",
        _row_batch("migrations", "id,migration"),
    ),
    Poison(
        b'[{"id": "x", "colour": "red", "_k": "x", "_h": "h", "_s": ["threads", 1, null]}]',
        "forbidden_change",
        "unknown column threads.colour",
        _row_batch("threads", "id,colour"),
    ),
]


def _document_headers(**overrides: bytes) -> Headers:
    provenance = Provenance(
        export_sha256="e" * 64,
        run_id=1,
        table="messages",
        line=99,
        doc_id="messages:poison",
        content_hash="0" * 64,
    )
    headers = dict(document_headers(provenance))
    headers.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return list(headers.items())


_DOC = b'{"_id": "messages:poison", "messageId": "poison", "threadId": "t", "text": "x"}'

DOCUMENT_POISON = [
    Poison(b"\x00\xff garbage", "undecodable_record", "not JSON", _document_headers()),
    Poison(_DOC, "undecodable_record", "no khala-table header", []),
    Poison(
        _DOC, "undecodable_record", "'abc' is not a number", _document_headers(khala_run=b"abc")
    ),
    Poison(_DOC, "undecodable_record", "khala-line header", _document_headers(khala_line=b"-1")),
    Poison(_DOC, "undecodable_record", "not a sha256", _document_headers(khala_hash=b"123")),
    Poison(
        _DOC, "undecodable_record", "khala-id header is not", _document_headers(khala_id=b"\xff")
    ),
    Poison(_DOC, "undecodable_record", "a users document", _document_headers(khala_table=b"users")),
    Poison(_DOC, "undecodable_record", "the key is not UTF-8", _document_headers(), b"\xfe\xff"),
    Poison(_DOC, "undecodable_record", "the key is empty", _document_headers(), b""),
    Poison(b"[1, 2]", "undecodable_record", "not a JSON object", _document_headers()),
    Poison(None, "undecodable_record", "the record has no value", _document_headers()),
    Poison(
        _DOC,
        "undecodable_record",
        "a tombstone with a value",
        _document_headers(khala_run=b"5", khala_generation=b"2", khala_deleted=b"1"),
    ),
    Poison(
        _DOC,
        "undecodable_record",
        "names no earlier run",
        _document_headers(khala_generation=b"1"),
    ),
]


async def _send(bootstrap: str, topic: str, poisons: list[Poison]) -> list[Sent]:
    producer = make_producer(KafkaSettings(bootstrap_servers=bootstrap))
    await producer.start()
    try:
        sent = []
        for p in poisons:
            key = p.key if p.key is not None else b"poison"
            meta = await producer.send_and_wait(
                topic, p.value, key=key, headers=p.headers, partition=0
            )
            sent.append(Sent(p, topic, meta.partition, meta.offset))
        return sent
    finally:
        await producer.stop()


def send(bootstrap: str, topic: str, poisons: list[Poison]) -> list[Sent]:
    return asyncio.run(_send(bootstrap, topic, poisons))


def letters(bootstrap: str, prefix: str) -> list[StoredDeadLetter]:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    return asyncio.run(read_dead_letters(kafka, Topics(prefix).dead_letters))


def assert_set_aside(found: list[StoredDeadLetter], sent: list[Sent], stage: str) -> None:
    """One letter per poison record, with its bytes, where it was read, and why."""
    by_place = {
        (s.letter.source_topic, s.letter.source_partition, s.letter.source_offset): s.letter
        for s in found
    }
    assert len(by_place) == len(found)  # each record set aside once
    for s in sent:
        letter = by_place.get((s.topic, s.partition, s.offset))
        assert letter is not None, f"no dead letter for {s.poison}"
        assert letter.stage == stage and letter.reason_code == s.poison.code
        assert s.poison.reason in letter.reason, (s.poison, letter.reason)
        assert letter.raw == (s.poison.value or b"")
    assert set(by_place) == {(s.topic, s.partition, s.offset) for s in sent}


def ledger_size(db_url: str) -> int:
    (found,) = run_db(db_url, [sa.text("SELECT count(*) FROM khala_import_rows")])
    return int(found[0][0])


def test_garbage_and_forged_changes_are_set_aside_and_the_sink_goes_on(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(fixture_a)], env))
    run_db(
        pg_url,
        [
            sa.text("CREATE TABLE migrations (id serial PRIMARY KEY, migration varchar(255))"),
            sa.text("INSERT INTO migrations (migration) VALUES ('create_users_table')"),
        ],
    )
    before, ledger = table_snapshot(pg_url), ledger_size(pg_url)
    assert before["threads"] and before["users"] and before["autopilots"]

    topic = Topics(topic_prefix).changes
    sent = send(kafka_bootstrap, topic, CHANGES_POISON)
    good = _changes({**_change("threads", "upsert", "t-good", **GOOD_ROW), "hash": "h"})
    [after_poison] = send(kafka_bootstrap, topic, [Poison(good, "", "")])
    assert after_poison.offset > sent[-1].offset

    ok(khala(["sink", "--until-idle"], env, timeout=120))

    after = table_snapshot(pg_url)
    added = [row for row in after["threads"] if row[0] == "t-good"]
    assert len(added) == 1 and "Applied after the poison" in added[0]  # the sink went on
    after["threads"] = [row for row in after["threads"] if row[0] != "t-good"]
    assert_same_tables(before, after, "no forged change may touch a table")
    assert ledger_size(pg_url) == ledger + 1
    (migrations,) = run_db(pg_url, [sa.text("SELECT migration FROM migrations")])
    assert [m for (m,) in migrations] == ["create_users_table"]

    found = letters(kafka_bootstrap, topic_prefix)
    assert_set_aside(found, sent, "sink")

    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"undecodable_record": 7, "forbidden_change": 8}
    places = {
        (d["source_topic"], d["source_partition"], d["source_offset"]) for d in listed["letters"]
    }
    assert places == {(topic, 0, s.offset) for s in sent}
    human = ok(khala(["dlq", "list"], env)).stdout
    first = sent[0]
    assert f"{topic} partition 0 offset {first.offset}: not JSON" in human
    assert "truncate of users refused" in human

    # The position moved past the poison: a sink started again sets nothing aside twice.
    ok(khala(["sink", "--until-idle"], env, timeout=120))
    assert len(letters(kafka_bootstrap, topic_prefix)) == len(found)

    # They are not rows the database refused: replay leaves them, listed, and touches nothing.
    replayed = orjson.loads(ok(khala(["dlq", "replay", "--json"], env)).stdout)
    assert replayed == {"retried": 0, "applied": 0, "still_refused": [], "not_retryable": 15}
    assert orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)["total"] == 15
    again = table_snapshot(pg_url)
    again["threads"] = [row for row in again["threads"] if row[0] != "t-good"]
    assert_same_tables(before, again, "dlq replay must not apply a set-aside record")


def test_a_forged_refusal_letter_is_not_replayed(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """The dead-letter topic is no more trusted than the changes topic: a letter posing as a
    refused row whose change breaks the sink's rules is not applied by `dlq replay`."""
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(fixture_a)], env))
    before = table_snapshot(pg_url)
    forged = {
        "v": 1,
        "stage": "sink",
        "reason_code": "db_refused",
        "reason": "value too long",
        "raw": base64.b64encode(orjson.dumps(_change("users", "truncate"))).decode(),
        "table": "users",
    }
    send(kafka_bootstrap, Topics(topic_prefix).dead_letters, [Poison(orjson.dumps(forged), "", "")])
    replayed = orjson.loads(ok(khala(["dlq", "replay", "--json"], env)).stdout)
    assert replayed == {"retried": 0, "applied": 0, "still_refused": [], "not_retryable": 1}
    assert_same_tables(before, table_snapshot(pg_url), "a forged letter must not be replayed")


def test_undecodable_documents_are_set_aside_and_the_processor_goes_on(
    tmp_path: Path, fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(fixture_a)], env))
    before = table_snapshot(pg_url)
    topics = Topics(topic_prefix)
    sent = send(kafka_bootstrap, topics.source("messages"), DOCUMENT_POISON)
    on_threads = Poison(
        b"{", "undecodable_record", "not JSON", _document_headers(khala_table=b"threads")
    )
    sent += send(kafka_bootstrap, topics.source("threads"), [on_threads])

    ok(khala(["process", "--until-idle"], env, timeout=120))
    found = letters(kafka_bootstrap, topic_prefix)
    assert_set_aside(found, sent, "process")
    assert_same_tables(before, table_snapshot(pg_url), "no poison document may touch a table")
    (stored,) = run_db(
        pg_url,
        [sa.text("SELECT count(*) FROM khala_import_documents WHERE doc_key = 'poison'")],
    )
    assert stored[0][0] == 0
    ok(khala(["process", "--until-idle"], env, timeout=120))  # moved past: nothing twice
    assert len(letters(kafka_bootstrap, topic_prefix)) == len(found)
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"undecodable_record": len(sent)}
    assert {d["stage"] for d in listed["letters"]} == {"process"}

    # More poison, then an export with one more message: the import's processor reads the
    # poison first, sets it aside, and imports the message after it.
    late = send(kafka_bootstrap, topics.source("messages"), DOCUMENT_POISON[:1])
    tables = load_reference_fixture("fixture-a")
    tables["messages"].append(
        {
            "_id": "messages:after",
            "threadId": THREAD,
            "messageId": "55555555-5555-5555-5555-555555555555",
            "role": "user",
            "text": "after the poison",
            "createdAtMs": 1735700030000,
        }
    )
    export = tmp_path / "more.zip"
    write_fixture_zip(export, tables)
    ok(khala(["import-chat", str(export)], env, timeout=240))
    assert counts(pg_url)["messages"] == len(before["messages"]) + 1
    query = "SELECT content FROM messages WHERE id = '55555555-5555-5555-5555-555555555555'"
    assert run_db(pg_url, [sa.text(query)]) == [[("after the poison",)]]
    late_topic, late_offset = late[0].topic, late[0].offset
    assert_set_aside(
        [
            s
            for s in letters(kafka_bootstrap, topic_prefix)
            if (s.letter.source_topic, s.letter.source_offset) == (late_topic, late_offset)
        ],
        late,
        "process",
    )
