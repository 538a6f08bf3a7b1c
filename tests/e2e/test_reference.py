"""The reference importer's four tests (reference §8.1) and fixture A's golden rows (§8.3),
through the CLI against the real broker and database."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from khala_stream.db.laravel_tables import TABLES
from tests.e2e.harness import LARAVEL_TABLES, counts, env_for, json_value, khala, ok, rows, run_db
from tests.fakes.workos_server import FakeWorkos

THREAD = "11111111-1111-1111-1111-111111111111"
RUN = "22222222-2222-2222-2222-222222222222"
GRAVATAR = "https://www.gravatar.com/avatar/2151180fb863dfaeedff2cb9c9145d75?d=identicon"


def ts(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value)


def test_dry_run_parses_without_writing(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["db", "init"], env))
    result = ok(khala(["import-chat", str(fixture_a), "--dry-run", "--replace"], env))
    assert counts(db_url) == dict.fromkeys(LARAVEL_TABLES, 0)
    assert "Dry-run completed: no database writes were performed." in result.stdout
    assert "Truncated target chat tables" not in result.stdout
    # The dry run still knows what a real run would do (SPEC §4).
    assert result.counters["autopilots_created"] == 1
    assert result.counters["threads_imported"] == 1
    (runs,) = run_db(db_url, [sa.text("SELECT count(*) FROM khala_import_runs")])
    assert runs[0][0] == 0


def test_imports_users_autopilot_and_linkage(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    result = ok(khala(["import-chat", str(fixture_a), "--replace"], env))
    assert "Truncated target chat tables (--replace)." in result.stdout
    assert "Import completed successfully." in result.stdout
    (user,) = [u for u in rows(db_url, "users") if u["workos_id"] == "userlegacy1"]
    (autopilot,) = rows(db_url, "autopilots")
    assert autopilot["owner_user_id"] == user["id"]
    (profile,) = rows(db_url, "autopilot_profiles", "autopilot_id")
    (policy,) = rows(db_url, "autopilot_policies", "autopilot_id")
    assert profile["autopilot_id"] == policy["autopilot_id"] == autopilot["id"]
    assert profile["owner_display_name"] == "Chris"
    (thread,) = rows(db_url, "threads")
    assert (thread["id"], thread["user_id"], thread["autopilot_id"]) == (
        THREAD,
        user["id"],
        autopilot["id"],
    )
    (run,) = rows(db_url, "runs")
    assert run["id"] == RUN and run["status"] == "completed"
    assert run["autopilot_id"] == autopilot["id"]
    assert run["autopilot_config_version"] == autopilot["config_version"]
    messages = rows(db_url, "messages")
    assert len(messages) == 2
    assert {m["autopilot_id"] for m in messages} == {autopilot["id"]}
    conversation_messages = rows(db_url, "agent_conversation_messages")
    assert [m["conversation_id"] for m in conversation_messages] == [THREAD, THREAD]
    (event,) = rows(db_url, "run_events")
    assert event["run_id"] == RUN and event["type"] == "legacy_receipt_tool"
    assert event["autopilot_id"] == event["actor_autopilot_id"] == autopilot["id"]
    assert event["actor_type"] == "autopilot"
    assert "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa" not in {t["id"] for t in rows(db_url, "threads")}


def test_fixture_a_golden_rows(
    fixture_a: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    """Reference §8.3, column by column; differences only where SPEC §3 says so."""
    env = env_for(kafka_bootstrap, topic_prefix, db_url)
    result = ok(khala(["import-chat", str(fixture_a)], env))
    assert result.counters == {
        "source_users": 1,
        "source_threads": 2,
        "source_runs": 1,
        "source_messages": 2,
        "source_receipts": 1,
        "source_blueprints": 1,
        "users_imported": 1,
        "users_resolved_via_workos": 0,
        "users_unresolved_placeholder": 0,
        "users_email_conflicts": 0,
        "threads_imported": 1,
        "runs_imported": 1,
        "messages_imported": 2,
        "events_imported": 1,
        "autopilots_created": 1,
        "autopilot_profiles_upserted": 1,
        "autopilot_policies_upserted": 1,
        "blueprints_mapped": 1,
        "threads_linked_backfilled": 0,
        "runs_linked_backfilled": 0,
        "messages_linked_backfilled": 0,
        "run_events_linked_backfilled": 0,
    }
    (user,) = rows(db_url, "users")
    assert {k: ts(v) if k.endswith("_at") and v else v for k, v in user.items()} == {
        "id": 1,
        "name": "legacy",
        "email": "legacy@example.com",
        "handle": None,
        "email_verified_at": None,
        "workos_id": "userlegacy1",
        "remember_token": None,
        "avatar": GRAVATAR,
        "created_at": "2025-01-01 02:53:20",
        "updated_at": "2025-01-01 02:53:20",
    }
    (autopilot,) = rows(db_url, "autopilots")
    persona = (
        "Identity: Autopilot || Voice: direct and practical || Core truths: Prefer verification"
        " over guessing || Boundaries: No irreversible changes without explicit approval || Rules:"
        " You are Autopilot."
    )
    assert len(persona) == 194
    expected_autopilot = {
        "owner_user_id": 1,
        "handle": "autopilot-1",
        "display_name": "Chris",
        "avatar": GRAVATAR,
        "status": "active",
        "visibility": "private",
        "tagline": persona,
        "config_version": 2,
        "deleted_at": None,
    }
    assert {k: autopilot[k] for k in expected_autopilot} == expected_autopilot
    assert len(autopilot["id"]) == 36  # deterministic uuid5 of the owner (SPEC §3.6)
    (profile,) = rows(db_url, "autopilot_profiles", "autopilot_id")
    assert profile["owner_display_name"] == "Chris"
    assert profile["autopilot_voice"] == "direct and practical"
    assert profile["persona_summary"] == persona
    assert json_value(profile["principles"]) == ["Prefer verification over guessing"]
    assert json_value(profile["preferences"]) == {
        "user": {
            "name": "Chris",
            "addressAs": "Chris",
            "pronouns": None,
            "timeZone": None,
            "context": None,
            "notes": None,
        },
        "character": {
            "boundaries": ["No irreversible changes without explicit approval"],
            "continuity": "Keep a durable profile.",
            "vibe": None,
        },
        "identity": {"name": "Autopilot", "emoji": None, "creature": None},
    }
    assert json_value(profile["onboarding_answers"]) == {
        "bootstrapState": {"status": "complete", "stage": None, "templateVersion": 5.0},
        "user": {"name": "Chris", "addressAs": "Chris", "pronouns": None, "timeZone": None},
        "identity": {"name": "Autopilot", "vibe": "direct and practical"},
    }
    assert profile["schema_version"] == 1
    (policy,) = rows(db_url, "autopilot_policies", "autopilot_id")
    assert policy["l402_require_approval"] in (True, 1)
    assert json_value(policy["tool_allowlist"]) == [] and json_value(policy["tool_denylist"]) == []
    assert json_value(policy["l402_allowed_hosts"]) == ["sats4ai.com", "l402.openagents.com"]
    assert json_value(policy["data_policy"]) == {
        "source": "khala_blueprint",
        "rules": "You are Autopilot.",
        "continuity": "Keep a durable profile.",
    }
    assert policy["model_provider"] is None and policy["l402_max_spend_msats_per_call"] is None
    for table in ("threads", "agent_conversations"):
        (thread,) = rows(db_url, table)
        assert (thread["id"], thread["user_id"], thread["title"]) == (
            THREAD,
            1,
            "Summarize my previous conversation.",
        )
        assert (ts(thread["created_at"]), ts(thread["updated_at"])) == (
            "2025-01-01 02:53:21",
            "2025-01-01 02:53:22",
        )
    (run,) = rows(db_url, "runs")
    assert run["status"] == "completed" and run["autopilot_config_version"] == 2
    assert ts(run["started_at"]) == ts(run["created_at"]) == "2025-01-01 02:53:30"
    assert ts(run["completed_at"]) == ts(run["updated_at"]) == "2025-01-01 02:53:40"
    assert json_value(run["meta"]) == {
        "source": "khala",
        "sourceStatus": "final",
        "assistantMessageId": "44444444-4444-4444-4444-444444444444",
        "cancelRequested": False,
    }
    assert (run["model_provider"], run["model"], run["usage"], run["error"]) == (None,) * 4
    first, second = rows(db_url, "messages")
    assert (first["role"], first["run_id"], json_value(first["meta"])["sourceRunId"]) == (
        "user",
        None,
        None,
    )
    assert (second["role"], second["run_id"]) == ("assistant", RUN)
    assert first["content"] == "Summarize my previous conversation."
    for m in rows(db_url, "agent_conversation_messages"):
        assert m["agent"] == "autopilot" and m["attachments"] == "[]" and m["usage"] == "{}"
    (event,) = rows(db_url, "run_events")
    assert ts(event["created_at"]) == "2025-01-01 02:53:40"  # the 500 ms are dropped
    assert json_value(event["payload"]) == {
        "source": "khala_receipt",
        "kind": "tool",
        "receiptId": None,
        "signatureId": None,
        "compiledId": None,
        "json": {"tool": "echo", "ok": True},
    }


WORKOS_ANSWER = {
    "email": "resolved-user@openagents.com",
    "first_name": "Resolved",
    "last_name": "User",
    "profile_picture_url": "https://example.com/avatar.png",
}


def test_resolves_missing_emails_via_workos(
    fixture_b: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    with FakeWorkos(api_key="sk_test_resolve") as fake:
        fake.users["user_legacy_1"] = WORKOS_ANSWER
        env = env_for(
            kafka_bootstrap,
            topic_prefix,
            db_url,
            WORKOS_API_KEY="sk_test_resolve",
            WORKOS_BASE_URL=fake.base_url,
        )
        result = ok(
            khala(["import-chat", str(fixture_b), "--replace", "--resolve-workos-users"], env)
        )
        assert len(fake.requests_to("/user_management/users/user_legacy_1")) == 1
    assert result.counters["users_resolved_via_workos"] == 1
    assert result.counters["users_unresolved_placeholder"] == 0
    (user,) = rows(db_url, "users")
    assert user["email"] == "resolved-user@openagents.com"
    assert user["name"] == "Resolved User"
    assert "example.com/avatar.png" in user["avatar"]
    assert "sk_test_resolve" not in result.stdout + result.stderr


def test_email_conflict_falls_back_to_placeholder_and_stays_idempotent(
    fixture_b: Path, kafka_bootstrap: str, topic_prefix: str, db_url: str
) -> None:
    env0 = env_for(kafka_bootstrap, topic_prefix, db_url)
    ok(khala(["db", "init"], env0))
    run_db(
        db_url,
        [
            sa.insert(TABLES["users"]).values(
                name="Existing User",
                email="resolved-user@openagents.com",
                workos_id="user_existing",
                avatar="https://example.com/existing.png",
                handle="existing-user",
                email_verified_at=datetime(2026, 1, 1, 0, 0, 0),
            )
        ],
    )
    answer = {k: v for k, v in WORKOS_ANSWER.items() if k != "profile_picture_url"}
    results = []
    with FakeWorkos(api_key="sk_test_conflict") as fake:
        fake.users["user_legacy_1"] = answer
        env = {**env0, "WORKOS_API_KEY": "sk_test_conflict", "WORKOS_BASE_URL": fake.base_url}
        for _ in range(2):
            results.append(
                ok(khala(["import-chat", str(fixture_b), "--resolve-workos-users"], env))
            )
    first, second = results
    legacy = [u for u in rows(db_url, "users") if u["workos_id"] == "user_legacy_1"]
    assert len(legacy) == 1
    assert legacy[0]["email"] == "migrated+7c1a322ee560a5fe168b@openagents.local"
    assert legacy[0]["name"] == "Resolved User"
    assert first.counters["users_email_conflicts"] == 1
    assert second.counters["users_email_conflicts"] == 1
    assert counts(db_url) | {"users": 0} == {
        "users": 0,
        "autopilots": 1,
        "autopilot_profiles": 1,
        "autopilot_policies": 1,
        "threads": 1,
        "runs": 1,
        "messages": 2,
        "agent_conversations": 1,
        "agent_conversation_messages": 2,
        "run_events": 1,
    }
    # The second run computed everything again and found nothing to write.
    assert "rows written: none" in second.stdout


@pytest.mark.parametrize("replace", [False, True], ids=["merge", "replace"])
def test_resolve_workos_without_key_exits_2_before_any_write(
    fixture_b: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str, replace: bool
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    result = khala(
        [
            "import-chat",
            str(fixture_b),
            "--resolve-workos-users",
            *(["--replace"] if replace else []),
        ],
        env,
    )
    assert result.exit_code == 2
    assert "WORKOS_API_KEY" in result.stderr
    assert not Path(sqlite_url.split("///", 1)[1]).exists()
