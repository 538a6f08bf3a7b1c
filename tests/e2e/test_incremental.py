"""Incremental re-imports (SPEC §5, §3.8): only what changed is published and written, derived
values follow the changes, vanished documents are reported and deleted only on request, and
Laravel-side edits of unchanged documents survive."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from khala_stream.db.importer_tables import REFUSALS, RUNS
from khala_stream.db.laravel_tables import TABLES
from processors.unchanged import SKIPPED_KEY
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
        if line.startswith("  documents "):
            table, rest = line[len("  documents ") :].split(": ", 1)
            stats[table] = {k: int(v) for k, v in (p.split("=") for p in rest.split())}
    return stats


def test_newer_export_publishes_only_changes_and_derived_values_follow(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    tables = load_reference_fixture("fixture-a")
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["import-chat", str(_export(tmp_path / "v1.zip", tables))], env))
    (autopilot,) = rows(pg_url, "autopilots")
    assert autopilot["config_version"] == 2
    run_before = versions(pg_url)["runs"]

    v2 = _export(tmp_path / "v2.zip", _newer(tables))
    published = orjson.loads(ok(khala(["publish", str(v2), "--incremental", "--json"], env)).stdout)
    # Only the new and changed documents travel; the rest is marked in the ledger.
    assert published["published"] == {"messages": 2, "blueprints": 1}
    assert published["unchanged"] == {"users": 1, "threads": 2, "runs": 1, "messages": 1}
    ok(khala(["process", "--until-idle"], env))
    ok(khala(["sink", "--until-idle"], env))

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


def _latest_counters(db_url: str) -> tuple[dict[str, int], dict[str, Any]]:
    run = latest_run(db_url)
    assert run is not None and run.status == "derived"
    return run_counters(run), run.counters


def test_unchanged_reimport_skips_the_derivation_and_counts_like_a_full_one(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    export = tmp_path / "plain.zip"
    generate_export(export, users=6, seed=21, edge_cases=False)
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["import-chat", str(export)], env))
    first, first_raw = _latest_counters(db_url)
    assert first_raw[SKIPPED_KEY] is False and first["autopilots_created"] == 6
    before = table_snapshot(db_url)

    again = ok(khala(["import-chat", str(export)], env))
    skipped, skipped_raw = _latest_counters(db_url)
    assert skipped_raw[SKIPPED_KEY] is True
    assert "rows written: none" in again.stdout
    assert table_snapshot(db_url) == before

    # A row deleted in Laravel: the next run derives in full, brings the row back, and
    # reports the counters the skipped run reported.
    messages = TABLES["messages"]
    (gone,) = run_db(db_url, [sa.select(messages.c.id).order_by(messages.c.id).limit(1)])[0]
    run_db(db_url, [sa.delete(messages).where(messages.c.id == gone.id)])
    restored = ok(khala(["import-chat", str(export)], env))
    full, full_raw = _latest_counters(db_url)
    assert full_raw[SKIPPED_KEY] is False
    assert "rows written: messages=1" in restored.stdout
    assert full == skipped
    assert table_snapshot(db_url) == before


def test_reimport_after_refused_rows_derives_in_full(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """Rows the database refused are offered again by a full derivation (and set aside again):
    a run after one with refusals is never skipped. (PostgreSQL: SQLite refuses no length.)"""
    db_url = pg_url
    export = tmp_path / "edges.zip"
    generate_export(export, users=6, seed=22, edge_cases=True)
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["import-chat", str(export)], env))
    first, _ = _latest_counters(db_url)
    refused = _refusals(db_url)
    assert refused > 0, "the edge cases include a row the database refuses"
    ok(khala(["import-chat", str(export)], env))
    again, again_raw = _latest_counters(db_url)
    assert again_raw[SKIPPED_KEY] is False
    assert _refusals(db_url) == 2 * refused
    settled = ("autopilots_created", "autopilot_profiles_upserted", "autopilot_policies_upserted")
    assert again == first | dict.fromkeys(settled, 0)


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
    assert raw[SKIPPED_KEY] is False
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
