"""Run events written by older importers (no receipt key known): matched by content instead of
duplicated, and linked to the owner's autopilot (reference §3.6, SPEC §3.4)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import orjson
import sqlalchemy as sa

from khala_stream.db.laravel_tables import TABLES
from tests.e2e.harness import env_for, json_value, khala, ok, rows, run_db

THREAD = "11111111-1111-1111-1111-111111111111"
RUN = "22222222-2222-2222-2222-222222222222"
PAYLOAD = {
    "source": "khala_receipt",
    "kind": "tool",
    "receiptId": None,
    "signatureId": None,
    "compiledId": None,
    "json": {"tool": "echo", "ok": True},
}


def test_older_importers_events_are_matched_and_linked(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["db", "init"], env))
    events = TABLES["run_events"]
    run_db(
        db_url,
        [
            sa.insert(TABLES["users"]).values(
                id=1,
                name="legacy",
                email="legacy@example.com",
                workos_id="userlegacy1",
                avatar="",
            ),
            # What the v1 importer wrote: no autopilot columns, the same content.
            sa.insert(events).values(
                thread_id=THREAD,
                run_id=RUN,
                user_id=1,
                actor_type="user",
                type="legacy_receipt_tool",
                payload=orjson.dumps(PAYLOAD).decode(),
                created_at=datetime(2025, 1, 1, 2, 53, 40),
            ),
            # Another old event of the same run, with other content: linked, not matched.
            sa.insert(events).values(
                thread_id=THREAD,
                run_id=RUN,
                user_id=1,
                actor_type="user",
                type="legacy_receipt_model",
                payload=orjson.dumps({**PAYLOAD, "kind": "model"}).decode(),
                created_at=datetime(2025, 1, 1, 2, 53, 41),
            ),
        ],
    )
    first = ok(khala(["import-chat", str(fixture_a)], env))
    stored = rows(db_url, "run_events")
    assert len(stored) == 2  # the receipt matched the old event by content: no duplicate
    (autopilot,) = rows(db_url, "autopilots")
    for event in stored:
        assert event["autopilot_id"] == event["actor_autopilot_id"] == autopilot["id"]
        assert event["actor_type"] == "autopilot"
    assert json_value(stored[0]["payload"]) == PAYLOAD
    assert first.counters["events_imported"] == 1
    assert first.counters["run_events_linked_backfilled"] == 2
    second = ok(khala(["import-chat", str(fixture_a)], env))
    assert second.counters["run_events_linked_backfilled"] == 0
    assert len(rows(db_url, "run_events")) == 2
