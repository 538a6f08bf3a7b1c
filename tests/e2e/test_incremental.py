"""Incremental re-imports (SPEC §5, §3.8): only what changed is published and written, derived
values follow the changes, vanished documents are reported and deleted only on request, and
Laravel-side edits of unchanged documents survive."""

from __future__ import annotations

import contextlib
import copy
import zipfile
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from khala_stream.contract import codec
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from khala_stream.db.importer_tables import DOCUMENT_LOOKUPS, REFUSALS, ROWS, RUNS
from khala_stream.db.laravel_tables import TABLES
from producers.generator import generate_export, load_reference_fixture, write_fixture_zip
from tests.e2e.harness import env_for, json_value, khala, ok, rows, run_db, versions
from tests.e2e.snapshot import assert_same_tables, table_snapshot
from tests.e2e.stages import latest_run, run_counters

THREAD = "11111111-1111-1111-1111-111111111111"
FIRST_MESSAGE = "33333333-3333-3333-3333-333333333333"


def _export(path: Path, tables: dict[str, list[dict[str, Any]]]) -> Path:
    write_fixture_zip(path, tables)
    return path


def _newer(tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """A later snapshot: an edited first message, a new message, a changed blueprint, and the
    receipt gone."""
    newer = copy.deepcopy(tables)
    newer["messages"][0]["text"] = "Plan the   migration\nweekend."
    newer["messages"].append(
        {
            "_id": "messages:3",
            "threadId": THREAD,
            "messageId": "55555555-5555-5555-5555-555555555555",
            "role": "user",
            "status": "final",
            "text": "And the rollback?",
            "createdAtMs": 1735700030000,
            "updatedAtMs": 1735700030000,
        }
    )
    newer["blueprints"][0]["blueprint"]["docs"]["identity"]["vibe"] = "calm and exact"
    newer["blueprints"][0]["updatedAtMs"] = 1735700040000
    newer["receipts"] = []
    return newer


def _doc_stats(stdout: str) -> dict[str, dict[str, int]]:
    stats = {}
    for line in stdout.splitlines():
        if line.startswith("  documents ") and ": inserted=" in line:
            table, rest = line[len("  documents ") :].split(": ", 1)
            stats[table] = {k: int(v) for k, v in (p.split("=") for p in rest.split())}
    return stats


def _store_lookups(db_url: str) -> set[str]:
    """The document store's lookup indexes (`DOCUMENT_LOOKUPS`) present."""
    query = sa.text("SELECT indexname FROM pg_indexes WHERE tablename = 'khala_import_documents'")
    return {name for (name,) in run_db(db_url, [query])[0]} & set(DOCUMENT_LOOKUPS)


def test_newer_export_publishes_only_changes_and_derived_values_follow(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    tables = load_reference_fixture("fixture-a")
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(_export(tmp_path / "v1.zip", tables))], env))
    (autopilot,) = rows(pg_url, "autopilots")
    assert autopilot["config_version"] == 2
    run_before = versions(pg_url)["runs"]
    assert _store_lookups(pg_url) == set()  # a first import does without them

    v2 = _export(tmp_path / "v2.zip", _newer(tables))
    published = orjson.loads(ok(khala(["publish", str(v2), "--incremental", "--json"], env)).stdout)
    # Only the new and changed documents travel; the rest is marked in the ledger.
    assert published["published"] == {"messages": 2, "blueprints": 1}
    assert published["unchanged"] == {"users": 1, "threads": 2, "runs": 1, "messages": 1}
    ok(khala(["process", "--until-idle"], env))
    ok(khala(["sink", "--until-idle"], env))
    assert _store_lookups(pg_url) == set(DOCUMENT_LOOKUPS)  # built for the first run after

    # The same newer export through import-chat: now nothing is new.
    result = ok(khala(["import-chat", str(v2)], env))
    stats = _doc_stats(result.stdout)
    assert stats["messages"] == {"inserted": 0, "updated": 0, "unchanged": 3, "not_in_export": 0}
    assert stats["receipts"]["not_in_export"] == 1  # reported, not deleted
    assert "rows written: none" in result.stdout

    (thread,) = rows(pg_url, "threads")
    assert thread["title"] == "Plan the migration weekend."  # the title follows its message
    assert {m["id"] for m in rows(pg_url, "messages")} >= {"55555555-5555-5555-5555-555555555555"}
    (profile,) = rows(pg_url, "autopilot_profiles", "autopilot_id")
    assert profile["autopilot_voice"] == "calm and exact"
    (autopilot,) = rows(pg_url, "autopilots")
    assert autopilot["config_version"] == 3  # one real change, one bump
    (run,) = rows(pg_url, "runs")
    assert run["autopilot_config_version"] == 3
    assert versions(pg_url)["runs"] != run_before
    assert len(rows(pg_url, "run_events")) == 1  # the vanished receipt's event stays

    dry = ok(khala(["import-chat", str(v2), "--propagate-deletes", "--dry-run"], env))
    assert "rows a real run would write: run_events=1" in dry.stdout  # the real run below
    assert _doc_stats(dry.stdout)["receipts"]["would_delete"] == 1
    deleted = ok(khala(["import-chat", str(v2), "--propagate-deletes"], env))
    assert _doc_stats(deleted.stdout)["receipts"]["deleted"] == 1
    assert "rows written: run_events=1" in deleted.stdout
    assert rows(pg_url, "run_events") == []
    again = ok(khala(["import-chat", str(v2)], env))
    assert "receipts" not in _doc_stats(again.stdout)  # nothing left to report


def test_laravel_edits_of_unchanged_documents_survive_and_deleted_rows_come_back(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    export = _export(tmp_path / "a.zip", load_reference_fixture("fixture-a"))
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["import-chat", str(export)], env))
    threads, messages = TABLES["threads"], TABLES["messages"]
    profiles = TABLES["autopilot_profiles"]
    run_db(
        db_url,
        [
            sa.update(threads).values(title="Renamed in Laravel"),
            sa.update(profiles).values(owner_display_name="Christopher"),
            sa.delete(messages).where(messages.c.id == FIRST_MESSAGE),
        ],
    )
    result = ok(khala(["import-chat", str(export)], env))
    (thread,) = rows(db_url, "threads")
    assert thread["title"] == "Renamed in Laravel"
    (profile,) = rows(db_url, "autopilot_profiles", "autopilot_id")
    assert profile["owner_display_name"] == "Christopher"
    restored = [m for m in rows(db_url, "messages") if m["id"] == FIRST_MESSAGE]
    assert len(restored) == 1 and restored[0]["content"] == "Summarize my previous conversation."
    assert json_value(restored[0]["meta"])["source"] == "khala"
    assert "rows written: messages=1" in result.stdout
    (autopilot,) = rows(db_url, "autopilots")
    assert autopilot["config_version"] == 2  # nothing of the profile was recomputed differently


def _latest_counters(db_url: str) -> tuple[dict[str, int], DerivationSummary]:
    run = latest_run(db_url)
    assert run is not None and run.status == "derived" and run.summary is not None
    return run_counters(run), run.summary


def test_unchanged_reimport_skips_the_derivation_and_counts_like_a_full_one(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    export = tmp_path / "plain.zip"
    generate_export(export, users=6, seed=21, edge_cases=False)
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["import-chat", str(export)], env))
    first, first_raw = _latest_counters(db_url)
    assert first_raw.skipped is False and first["autopilots_created"] == 6
    before = table_snapshot(db_url)

    again = ok(khala(["import-chat", str(export)], env))
    skipped, skipped_raw = _latest_counters(db_url)
    assert skipped_raw.skipped is True
    assert "rows written: none" in again.stdout
    assert table_snapshot(db_url) == before

    # A row deleted in Laravel: the next run derives in full, brings the row back, and
    # reports the counters the skipped run reported.
    messages = TABLES["messages"]
    (gone,) = run_db(db_url, [sa.select(messages.c.id).order_by(messages.c.id).limit(1)])[0]
    run_db(db_url, [sa.delete(messages).where(messages.c.id == gone.id)])
    restored = ok(khala(["import-chat", str(export)], env))
    full, full_raw = _latest_counters(db_url)
    assert full_raw.skipped is False
    assert "rows written: messages=1" in restored.stdout
    assert full == skipped
    assert table_snapshot(db_url) == before


def test_reimport_after_refused_rows_is_skipped_and_refuses_nothing_new(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """A refused row is settled until something changes: the same export again is skipped,
    sets nothing aside again, writes nothing and reports what the first run reported.
    (PostgreSQL: SQLite refuses no length.)"""
    db_url = pg_url
    export = tmp_path / "edges.zip"
    generate_export(export, users=6, seed=22, edge_cases=True)
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    first_run = ok(khala(["import-chat", str(export)], env))
    first, _ = _latest_counters(db_url)
    refused = _refusals(db_url)
    assert refused > 0, "the edge cases include a row the database refuses"
    assert _refused(first_run.stdout) == refused
    letters = _refused_letters(env)
    assert letters == refused
    before = table_snapshot(db_url)
    dry = ok(khala(["import-chat", str(export), "--dry-run"], env))
    # A full derivation: the refused rows are settled.
    assert "rows a real run would write: none" in dry.stdout

    again_run = ok(khala(["import-chat", str(export)], env))
    again, again_raw = _latest_counters(db_url)
    assert again_raw.skipped is True
    assert _refusals(db_url) == refused
    assert _refused_letters(env) == letters
    assert "rows written: none" in again_run.stdout
    assert _refused(again_run.stdout) == 0  # none refused by this run
    settled = ("autopilots_created", "autopilot_profiles_upserted", "autopilot_policies_upserted")
    assert again == first | dict.fromkeys(settled, 0)
    assert table_snapshot(db_url) == before


LONG_ID = "m" * 40  # messages.id is varchar(36)


def _with_a_long_id(path: Path, text: str = "too long an id") -> Path:
    tables = load_reference_fixture("fixture-a")
    tables["messages"].append(
        {
            "_id": "messages:long",
            "threadId": THREAD,
            "messageId": LONG_ID,
            "role": "assistant",
            "text": text,
            "createdAtMs": 1735700021000,
        }
    )
    return _export(path, tables)


def test_a_changed_value_of_a_refused_row_is_offered_again(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """Only the refused value is settled: the row with another value is offered (and here
    refused) again, while the other refused rows stay settled."""
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(_with_a_long_id(tmp_path / "a.zip"))], env))
    assert _refused_keys(pg_url) == {
        (1, "messages", LONG_ID),
        (1, "agent_conversation_messages", LONG_ID),
    }
    ok(khala(["import-chat", str(_with_a_long_id(tmp_path / "a.zip"))], env))
    assert len(_refused_keys(pg_url)) == 2  # the same value: settled

    changed = _with_a_long_id(tmp_path / "b.zip", text="a longer answer now")
    result = ok(khala(["import-chat", str(changed)], env))
    _, raw = _latest_counters(pg_url)
    assert raw.skipped is False
    assert _refused_keys(pg_url) == {
        (run, table, LONG_ID)
        for run in (1, 3)
        for table in ("messages", "agent_conversation_messages")
    }
    assert _refused(result.stdout) == 2
    assert "rows written: none" in result.stdout  # offered, and refused: not written
    assert LONG_ID not in {m["id"] for m in rows(pg_url, "messages")}


def test_a_refused_row_replayed_after_the_fix_is_in_the_ledger_and_settled(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """`dlq replay` is how a refused row is retried once its cause is fixed: the row is
    written and recorded in the row ledger, so the next import writes nothing."""
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    export = _with_a_long_id(tmp_path / "a.zip")
    ok(khala(["import-chat", str(export)], env))
    assert len(_refused_keys(pg_url)) == 2
    run_db(
        pg_url,
        [
            sa.text("ALTER TABLE messages ALTER COLUMN id TYPE varchar(64)"),
            sa.text("ALTER TABLE agent_conversation_messages ALTER COLUMN id TYPE varchar(64)"),
        ],
    )
    replayed = orjson.loads(ok(khala(["dlq", "replay", "--json"], env)).stdout)
    assert replayed["applied"] == 2 and replayed["still_refused"] == []
    ledger = {
        (t, h)
        for t, h in run_db(
            pg_url,
            [sa.select(ROWS.c.dest_table, ROWS.c.row_hash).where(ROWS.c.row_key == LONG_ID)],
        )[0]
    }
    refused = {
        (t, h)
        for t, h in run_db(pg_url, [sa.select(REFUSALS.c.dest_table, REFUSALS.c.row_hash)])[0]
    }
    assert ledger == refused and len(ledger) == 2  # the refused values, written after all
    before = table_snapshot(pg_url)

    again = ok(khala(["import-chat", str(export)], env))
    assert "rows written: none" in again.stdout
    assert _refused(again.stdout) == 0
    assert len(_refused_keys(pg_url)) == 2
    assert table_snapshot(pg_url) == before

    # Deleted in Laravel after the replay: a replayed row comes back like any other.
    run_db(pg_url, [sa.text(f"DELETE FROM messages WHERE id = '{LONG_ID}'")])
    restored = ok(khala(["import-chat", str(export)], env))
    assert "rows written: messages=1" in restored.stdout
    assert table_snapshot(pg_url) == before


def _refused_keys(db_url: str) -> set[tuple[int, str, str]]:
    c = REFUSALS.c
    (found,) = run_db(db_url, [sa.select(c.run_id, c.dest_table, c.row_key)])
    return {(int(r), t, k) for r, t, k in found}


def _refused_letters(env: dict[str, str]) -> int:
    """Refused rows in the dead-letter topic (bad lines are set aside by every publish)."""
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    return int(listed["by_reason"].get("db_refused", 0))


def _refusals(db_url: str) -> int:
    (found,) = run_db(db_url, [sa.select(sa.func.count()).select_from(REFUSALS)])
    return int(found[0][0])


def test_skip_blueprints_neither_reports_nor_forgets_the_blueprints_it_did_not_read(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    export = _export(tmp_path / "a.zip", load_reference_fixture("fixture-a"))
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    first = ok(khala(["import-chat", str(export)], env))
    assert _doc_stats(first.stdout)["blueprints"]["inserted"] == 1

    for flags in ([], ["--propagate-deletes"], ["--dry-run", "--propagate-deletes"]):
        skipped = ok(khala(["import-chat", str(export), "--skip-blueprints", *flags], env))
        assert "blueprints" not in _doc_stats(skipped.stdout), flags  # not read: not "deleted"
    again = ok(khala(["import-chat", str(export)], env))
    assert _doc_stats(again.stdout)["blueprints"] == {
        "inserted": 0,
        "updated": 0,
        "unchanged": 1,
        "not_in_export": 0,
    }


def test_the_same_documents_in_another_order_are_derived_again(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    """Two blueprints of a thread with the same recency: the later line wins (reference
    §5.1). Swapping their lines changes no document, but changes the pick."""
    tables = load_reference_fixture("fixture-a")
    (first,) = tables["blueprints"]
    second = copy.deepcopy(first)
    second["_id"] = "blueprints:2"
    second["blueprint"]["docs"]["identity"]["vibe"] = "calm and exact"
    env = env_for(kafka_bootstrap, topic_prefix, db_url)

    ok(
        khala(
            [
                "import-chat",
                str(_export(tmp_path / "a.zip", tables | {"blueprints": [first, second]})),
            ],
            env,
        )
    )
    (profile,) = rows(db_url, "autopilot_profiles", "autopilot_id")
    assert profile["autopilot_voice"] == "calm and exact"  # the later line

    swapped = _export(tmp_path / "b.zip", tables | {"blueprints": [second, first]})
    result = ok(khala(["import-chat", str(swapped)], env))
    assert _doc_stats(result.stdout)["blueprints"]["unchanged"] == 2
    _, raw = _latest_counters(db_url)
    assert raw.skipped is False
    (profile,) = rows(db_url, "autopilot_profiles", "autopilot_id")
    assert profile["autopilot_voice"] == "direct and practical"


def test_a_run_left_underived_is_superseded_by_the_next_import(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """An import stopped after publishing leaves a run no one derived. The next import takes
    over its documents (it marks the unchanged ones as its own), so the earlier run must not
    be derived from what is left of it: it is superseded, and the new run derives it all."""
    export = tmp_path / "plain.zip"
    generate_export(export, users=6, seed=21, edge_cases=False)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["publish", str(export)], env))  # run 1, published; no processor runs
    ok(khala(["import-chat", str(export)], env))  # run 2
    (statuses,) = run_db(pg_url, [sa.select(RUNS.c.id, RUNS.c.status).order_by(RUNS.c.id)])
    assert [tuple(r) for r in statuses] == [(1, "superseded"), (2, "derived")]

    fresh = f"sqlite+aiosqlite:///{tmp_path}/fresh.sqlite"
    ok(khala(["import-chat", str(export)], env_for(kafka_bootstrap, f"{topic_prefix}_f", fresh)))
    assert_same_tables(table_snapshot(fresh), table_snapshot(pg_url), "after a superseded run")


# --------------------------------------------------------------- partial exports (issue 22)

_THREADS = [f"{n}{n}{n}{n}{n}{n}{n}{n}-0000-0000-0000-000000000000" for n in (5, 6, 7)]


def _run_id(n: int) -> str:
    return f"{n}{n}{n}{n}{n}{n}{n}{n}-1111-1111-1111-111111111111"


def _message_id(n: int) -> str:
    return f"{n:08d}-2222-2222-2222-222222222222"


def _three_threads() -> dict[str, list[Any]]:
    """One user, three threads with a run each, two messages per run plus one more in the
    first thread, and a receipt per run."""
    tables: dict[str, list[Any]] = {
        "users": [{"_id": "users:1", "userId": "user_p", "email": "p@example.com"}],
        "threads": [],
        "runs": [],
        "messages": [],
        "receipts": [],
    }
    for n, thread in enumerate(_THREADS, start=1):
        at = 1735700000000 + n * 100000
        tables["threads"].append(
            {"_id": f"threads:{n}", "threadId": thread, "ownerId": "user_p", "createdAtMs": at}
        )
        tables["runs"].append(
            {
                "_id": f"runs:{n}",
                "threadId": thread,
                "runId": _run_id(n),
                "status": "final",
                "createdAtMs": at + 10,
            }
        )
        for m, role in ((2 * n - 1, "user"), (2 * n, "assistant")):
            tables["messages"].append(
                {
                    "_id": f"messages:{m}",
                    "threadId": thread,
                    "messageId": _message_id(m),
                    "role": role,
                    "text": f"message {m}",
                    "runId": _run_id(n),
                    "createdAtMs": at + m,
                }
            )
        tables["receipts"].append(
            {
                "_id": f"receipts:{n}",
                "threadId": thread,
                "runId": _run_id(n),
                "kind": "tool",
                "json": {"n": n},
                "createdAtMs": at + 20,
            }
        )
    tables["messages"].append(
        {
            "_id": "messages:7",
            "threadId": _THREADS[0],
            "messageId": _message_id(7),
            "role": "user",
            "text": "a message deleted since",
            "createdAtMs": 1735700100050,
        }
    )
    return tables


def _raw_zip(path: Path, tables: dict[str, list[Any]]) -> Path:
    """Like `write_fixture_zip`, but a `bytes` item is written as that raw line."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for table, items in tables.items():
            lines = [i if isinstance(i, bytes) else orjson.dumps(i) for i in items]
            archive.writestr(f"{table}/documents.jsonl", b"\n".join(lines) + b"\n")
    return path


def _chat_counts(db_url: str) -> dict[str, int]:
    names = ("threads", "runs", "messages", "agent_conversation_messages", "run_events")
    return {t: len(rows(db_url, t)) for t in names}


def test_propagate_deletes_deletes_only_what_a_fully_read_table_lost(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """A newer export without its receipts table, with a garbled runs line and a thread
    without its key: those tables delete nothing (and say so), the messages table, read
    whole, loses its one vanished message; a later complete export deletes what is gone."""
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    v1 = _three_threads()
    ok(khala(["import-chat", str(_raw_zip(tmp_path / "v1.zip", v1))], env))
    before = _chat_counts(pg_url)
    assert before == {
        "threads": 3,
        "runs": 3,
        "messages": 7,
        "agent_conversation_messages": 7,
        "run_events": 3,
    }

    partial = copy.deepcopy(v1)
    del partial["receipts"]
    partial["runs"][1] = b'{"_id": "runs:2", "threadId": "garbled'
    del partial["threads"][2]["threadId"]
    partial["messages"].pop()  # messages:7 is really gone
    v2 = _raw_zip(tmp_path / "v2.zip", partial)

    withheld = [
        "  no deletes from threads (--propagate-deletes): 1 documents without their key;"
        " its 1 vanished documents are kept",
        "  no deletes from runs (--propagate-deletes): 1 rejected lines;"
        " its 1 vanished documents are kept",
        "  no deletes from receipts (--propagate-deletes): missing from the export;"
        " its 3 vanished documents are kept",
    ]
    dry = ok(khala(["import-chat", str(v2), "--propagate-deletes", "--dry-run"], env))
    real = ok(khala(["import-chat", str(v2), "--propagate-deletes"], env))
    for result in (dry, real):
        for line in withheld:
            assert line in result.stdout.splitlines(), result.stdout
    written = [line for line in real.stdout.splitlines() if line.startswith("  rows written:")]
    would = "  rows a real run would write:"  # a dry run writes nothing
    assert [w.replace("  rows written:", would) for w in written] == [
        line for line in dry.stdout.splitlines() if line.startswith(would)
    ]
    assert "messages=1" in written[0] and "run_events" not in written[0]
    # Kept, not deleted: the tables whose deletes were withheld say so in their counts.
    assert _doc_stats(real.stdout)["receipts"]["not_in_export"] == 3
    assert _doc_stats(real.stdout)["messages"]["deleted"] == 1

    after = _chat_counts(pg_url)
    assert after == {**before, "messages": 6, "agent_conversation_messages": 6}
    assert _message_id(7) not in {m["id"] for m in rows(pg_url, "messages")}

    # The kept documents stay known: a complete export without receipt 3 deletes its event.
    complete = copy.deepcopy(v1)
    complete["messages"].pop()
    complete["receipts"].pop()
    v3 = _raw_zip(tmp_path / "v3.zip", complete)
    final = ok(khala(["import-chat", str(v3), "--propagate-deletes"], env))
    assert "no deletes from" not in final.stdout
    assert _chat_counts(pg_url) == {**after, "run_events": 2}


def _deadlocks(url: str) -> int:
    if not url.startswith("postgresql"):
        return 0
    query = sa.text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
    ((count,),) = run_db(url, [query])[0]
    return int(count)


def test_a_messy_export_again_is_unchanged_key_by_key_and_writes_nothing(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    """Repeated keys (SPEC §8.2), rejected lines and keyless documents: an unchanged export
    imported again publishes no document, counts every key as unchanged (a repeated key by its
    last line), writes no row, and marking and storing never deadlock."""
    export = tmp_path / "messy.zip"
    generate_export(export, users=40, seed=23, edge_cases=True)
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    first = _doc_stats(ok(khala(["import-chat", str(export)], env)).stdout)
    before = table_snapshot(db_url)
    deadlocks = _deadlocks(db_url)

    again = ok(khala(["import-chat", str(export)], env))
    stats = _doc_stats(again.stdout)
    assert stats, again.stdout
    for table, counts in stats.items():
        assert counts.get("inserted", 0) == 0, (table, counts)
        assert counts.get("updated", 0) == 0, (table, counts)
        keys = first[table].get("inserted", 0) + first[table].get("updated", 0)
        assert counts["unchanged"] == keys, (table, counts, first[table])
    # Rows the database refused last time (PostgreSQL refuses the edge cases' over-long ids)
    # are settled: not offered again, and the derivation is skipped.
    assert "rows written: none" in again.stdout
    assert _refused(again.stdout) == 0
    assert _latest_counters(db_url)[1].skipped is True
    assert table_snapshot(db_url) == before
    assert _deadlocks(db_url) == deadlocks


def _refused(stdout: str) -> int:
    prefix = "  rows refused by the database: "
    found = [x for x in stdout.splitlines() if x.startswith(prefix)]
    return int(found[0][len(prefix) :].split()[0]) if found else 0


def test_only_the_last_line_of_a_repeated_key_counts_on_a_reimport(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    tables = load_reference_fixture("fixture-a")
    message = tables["messages"][0]
    early = {**message, "text": "an earlier draft, never the winner"}
    tables["messages"] = [early, *tables["messages"]]  # the same messageId, first and later
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["import-chat", str(_export(tmp_path / "one.zip", tables))], env))
    before = table_snapshot(db_url)

    # The earlier line changes: it has no effect at all (SPEC §8.2).
    tables["messages"][0] = {**early, "text": "another earlier draft"}
    again = ok(khala(["import-chat", str(_export(tmp_path / "two.zip", tables))], env))
    assert _doc_stats(again.stdout)["messages"].get("updated", 0) == 0
    assert "rows written: none" in again.stdout
    assert table_snapshot(db_url) == before

    # The last line changes: that is an update.
    tables["messages"][1] = {**message, "text": "the winner, edited"}
    third = ok(khala(["import-chat", str(_export(tmp_path / "three.zip", tables))], env))
    assert _doc_stats(third.stdout)["messages"]["updated"] == 1
    contents = {r["content"] for r in rows(db_url, "messages")}
    assert "the winner, edited" in contents
    assert not any("draft" in c for c in contents)


def test_an_autopilot_whose_profile_an_interrupted_run_wrote_ends_at_version_2(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    """An import killed after the sink applied a new autopilot's profile and policy but not
    the autopilot: the rerun creates it at version 2, as one clean import does, not at 1."""
    export = _export(tmp_path / "a.zip", load_reference_fixture("fixture-a"))
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["import-chat", str(export)], env))
    (autopilot,) = rows(db_url, "autopilots")
    assert autopilot["config_version"] == 2
    autopilots = TABLES["autopilots"]
    run_db(  # what the killed attempt left: the profile and policy with their ledger entries
        db_url,
        [
            sa.delete(autopilots),
            sa.delete(ROWS).where(ROWS.c.dest_table == "autopilots"),
        ],
    )
    assert len(rows(db_url, "autopilot_profiles", "autopilot_id")) == 1
    # The rerun derives the owner again (its thread has a new message); blueprint unchanged.
    newer = _newer(load_reference_fixture("fixture-a"))
    newer["blueprints"] = load_reference_fixture("fixture-a")["blueprints"]
    ok(khala(["import-chat", str(_export(tmp_path / "b.zip", newer))], env))
    (again,) = rows(db_url, "autopilots")
    assert again["id"] == autopilot["id"]
    assert again["config_version"] == 2


def _entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip_entries(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def _edited_messages(data: bytes) -> bytes:
    """A later messages entry: one text edited, one line gone, one new message at the end."""
    lines = data.splitlines()
    keyed = []
    for i, line in enumerate(lines):
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(line)
            unique = lines.count(line) == 1
            if unique and isinstance(doc, dict) and isinstance(doc.get("messageId"), str):
                keyed.append((i, doc))
    (edit, doc), (gone, _), (_, model) = keyed[1], keyed[2], keyed[-1]
    lines[edit] = orjson.dumps({**doc, "text": f"{doc.get('text')} (edited)"})
    del lines[gone]
    lines.append(orjson.dumps({**model, "messageId": "later-message", "text": "new since"}))
    return b"\n".join(lines) + b"\n"


def test_tables_unchanged_byte_for_byte_are_carried_and_derive_as_if_read(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """A newer export whose messages changed and whose other entries are the same bytes: the
    others are carried over without being read (no document of theirs is sent) and the end
    state, counts included, is the one of the same documents read line by line (an entry
    with a blank line more: other bytes, the same documents)."""
    first = tmp_path / "first.zip"
    generate_export(first, users=30, seed=31, edge_cases=True)
    entries = _entries(first)
    messages = next(n for n in entries if n.startswith("messages/"))
    carried = {**entries, messages: _edited_messages(entries[messages])}
    read = {n: d if n == messages else d + b"\n" for n, d in carried.items()}

    outputs = []
    for name, later, url in (
        ("carried", carried, sqlite_url),
        ("read", read, f"sqlite+aiosqlite:///{tmp_path / 'read.sqlite'}"),
    ):
        env = env_for(kafka_bootstrap, f"{topic_prefix}-{name}", url)
        ok(khala(["import-chat", str(first)], env))
        newer = _zip_entries(tmp_path / f"{name}.zip", later)
        again = ok(khala(["import-chat", str(newer), "--propagate-deletes", "--json"], env))
        outputs.append((json_value(again.stdout), table_snapshot(url), url))

    (carried_report, carried_tables, carried_url), (read_report, read_tables, read_url) = outputs
    assert carried_tables == read_tables
    for key in ("documents", "counters", "rows_written", "rejected_lines", "missing_key"):
        assert carried_report[key] == read_report[key], key
    assert carried_report["documents"]["messages"]["updated"] == 1
    # The messages entry has rejected lines: its deletes are withheld, the loss reported.
    assert carried_report["documents"]["messages"]["not_in_export"] == 1
    assert "messages" in carried_report["deletes_withheld"]
    assert carried_report["documents"]["users"]["unchanged"] > 0

    def manifest(url: str) -> PublishManifest:
        latest = sa.select(RUNS.c.expected).where(RUNS.c.id == 2)
        ((expected,),) = run_db(url, [latest])[0]
        return codec.decode_manifest(expected, run_id=2, export_sha256="")

    by_carry, by_reading = manifest(carried_url), manifest(read_url)
    assert set(by_carry.carried) == set(by_carry.tables) - {"messages"}
    assert set(by_carry.carried.values()) == {1}
    assert by_carry.published == {"messages": by_reading.published["messages"]}
    assert by_reading.carried == {}
