"""Issue #6, part 2: WorkOS faults through `import-chat --resolve-workos-users` (SPEC §3.5,
§8.10), against the scripted FakeWorkos on 127.0.0.1.

The key is checked with one request before anything is written (401/403: exit 2, nothing
written, no look-up). During the run 429/5xx/timeouts/dropped connections/malformed JSON are
retried (Retry-After honoured, for every request of the key) and then resolve; a look-up that
keeps failing, a 404 or an answer without an email leave the placeholder, counted and logged
by user id only. Answers are cached across runs: a re-import asks WorkOS again only for the
users whose look-up failed.

The client's timeout (10 s) and backoff cap (8 s) cannot be changed from the CLI, so the
faults scripted here recover quickly (Retry-After: 0 or 1); one timeout costs 10 s.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from producers.generator import write_fixture_zip
from tests.e2e.harness import CliResult, counts, env_for, khala, ok, rows, run_db
from tests.fakes.workos_server import USERS_PATH, FakeWorkos, RecordedRequest, Reply, user_path

API_KEY = "sk_test_" + "f4ke" * 8
PLACEHOLDER = re.compile(r"migrated\+[0-9a-f]{20}@openagents\.local")


def workos_body(workos_id: str) -> dict[str, Any]:
    return {
        "object": "user",
        "id": workos_id,
        "email": f"{workos_id.replace('_', '.')}@workos.example.com",
        "first_name": "Resolved",
        "last_name": workos_id,
    }


def users_export(path: Path, ids: list[str], **emails: str) -> Path:
    """A users-only export: every id with a blank email unless given one."""
    docs = [
        {
            "_id": f"users:{n}",
            "userId": workos_id,
            "email": emails.get(workos_id, ""),
            "createdAtMs": 1735700000000 + n * 1000,
        }
        for n, workos_id in enumerate(ids, start=1)
    ]
    write_fixture_zip(path, {"users": docs})
    return path


def lookups(fake: FakeWorkos) -> list[RecordedRequest]:
    """Requests for one user (the key check is `GET /user_management/users`)."""
    return [r for r in fake.settled_requests() if r.path.startswith(USERS_PATH + "/")]


def per_user(fake: FakeWorkos) -> dict[str, int]:
    found: dict[str, int] = {}
    for r in lookups(fake):
        workos_id = r.path.rsplit("/", 1)[1]
        found[workos_id] = found.get(workos_id, 0) + 1
    return found


def import_runs(db_url: str) -> int:
    (found,) = run_db(db_url, [sa.text("SELECT count(*) FROM khala_import_runs")])
    return int(found[0][0])


def assert_no_email_or_key(result: CliResult, emails: list[str]) -> None:
    text = result.stdout + result.stderr
    assert API_KEY not in text
    for email in emails:
        assert email not in text, email


@pytest.fixture
def fake() -> Iterator[FakeWorkos]:
    with FakeWorkos(api_key=API_KEY) as server:
        yield server


def workos_env(
    kafka_bootstrap: str, topic_prefix: str, db_url: str, fake: FakeWorkos, key: str = API_KEY
) -> dict[str, str]:
    return env_for(
        kafka_bootstrap, topic_prefix, db_url, WORKOS_API_KEY=key, WORKOS_BASE_URL=fake.base_url
    )


# --------------------------------------------------------------------------- the key check


@pytest.mark.parametrize("refusal", ["bad-key-401", "forbidden-403", "unreachable-5xx"])
def test_a_refused_key_stops_before_anything_is_written(
    refusal: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    sqlite_url: str,
    fake: FakeWorkos,
) -> None:
    ids = [f"user_{n:02d}" for n in range(40)]
    export = users_export(tmp_path / "users.zip", ids)
    key = "sk_test_wrong_" + uuid.uuid4().hex if refusal == "bad-key-401" else API_KEY
    for fake_user in ids:
        fake.users[fake_user] = workos_body(fake_user)
    env = workos_env(kafka_bootstrap, topic_prefix, sqlite_url, fake, key)
    for extra in ([], ["--replace"], ["--dry-run"]):
        if refusal == "forbidden-403":
            fake.script(USERS_PATH, Reply(403, {"code": "forbidden"}))
        elif refusal == "unreachable-5xx":
            fake.script(USERS_PATH, *[Reply(503, headers={"Retry-After": "0"})] * 5)
        result = khala(["import-chat", str(export), "--resolve-workos-users", *extra], env)
        # A refused key is bad configuration (2); WorkOS out of reach is a run-time failure (1).
        exit_code = 1 if refusal == "unreachable-5xx" else 2
        assert result.exit_code == exit_code, result.stdout + result.stderr
        assert result.stdout == ""
        expected = {
            "bad-key-401": "the API key was refused (HTTP 401)",
            "forbidden-403": "the API key was refused (HTTP 403)",
            "unreachable-5xx": (
                f"could not check the API key at {fake.base_url}: HTTP 503 after 5 attempts"
            ),
        }[refusal]
        assert result.stderr == f"khala-stream: error: WorkOS: {expected}\n"
        assert key not in result.stderr
    # Not one placeholder, not one bookkeeping row: the database was never opened.
    assert not Path(sqlite_url.split("///", 1)[1]).exists()
    assert lookups(fake) == []
    checks = [r for r in fake.requests if r.path == USERS_PATH]
    assert {r.query for r in checks} == {"limit=1"}
    assert len(checks) == (15 if refusal == "unreachable-5xx" else 3)


def test_a_refused_key_leaves_a_prior_import_untouched_even_with_replace(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str, fake: FakeWorkos
) -> None:
    ids = ["user_a", "user_b"]
    export = users_export(tmp_path / "users.zip", ids)
    for fake_user in ids:
        fake.users[fake_user] = workos_body(fake_user)
    env = workos_env(kafka_bootstrap, topic_prefix, sqlite_url, fake)
    ok(khala(["import-chat", str(export), "--resolve-workos-users"], env))
    before = (counts(sqlite_url), rows(sqlite_url, "users"), import_runs(sqlite_url))
    fake.requests.clear()
    refused = {**env, "WORKOS_API_KEY": "sk_test_revoked"}
    result = khala(["import-chat", str(export), "--resolve-workos-users", "--replace"], refused)
    assert result.exit_code == 2
    assert "WorkOS: the API key was refused (HTTP 401)" in result.stderr
    assert (counts(sqlite_url), rows(sqlite_url, "users"), import_runs(sqlite_url)) == before
    assert lookups(fake) == []


# --------------------------------------------------------------------------- faults in the run

RECOVERING = {
    "user_retry_after": [Reply(429, {"message": "slow down"}, headers={"Retry-After": "1"})],
    "user_429_no_header": [Reply(429, {"message": "slow down"})],
    "user_500": [Reply(500, {"message": "oops"})],
    "user_502_html": [Reply(502, "<html>Bad Gateway</html>")],
    "user_dropped": [Reply(drop=True)],
    "user_bad_json": [Reply(200, '{"email": "half@')],
    "user_json_array": [Reply(200, ["not", "an", "object"])],
    # Well past the client's 10 s: a loaded machine can run the timeout late by a second or more.
    "user_timeout": [Reply(200, {"email": "late@workos.example.com"}, delay=14.0)],
}
FAILING = [Reply(503, {"message": "down"}, headers={"Retry-After": "0"})] * 5


def test_faults_are_retried_and_resolve_and_failures_get_placeholders(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str, fake: FakeWorkos
) -> None:
    ids = [
        *RECOVERING,
        "user_not_found",  # 404: WorkOS's word, cached
        "user_no_email",  # 200 without a usable email: WorkOS's word, cached
        "user_always_down",  # 5 x 503: unresolved, not cached
        "user_has_email",  # a valid export email: never looked up
        "legacy_not_workos",  # not a WorkOS id: never looked up
    ]
    export = users_export(tmp_path / "users.zip", ids, user_has_email="kept@example.com")
    for workos_id in ids:
        fake.users[workos_id] = workos_body(workos_id)
    fake.users.pop("user_not_found")
    fake.users["user_no_email"] = {"object": "user", "id": "user_no_email", "email": "not an email"}
    for workos_id, replies in RECOVERING.items():
        fake.script(user_path(workos_id), *replies)
    fake.script(user_path("user_always_down"), *FAILING)
    env = workos_env(kafka_bootstrap, topic_prefix, sqlite_url, fake)

    result = ok(khala(["import-chat", str(export), "--resolve-workos-users"], env))
    c = result.counters
    assert c["users_imported"] == len(ids)
    assert c["users_resolved_via_workos"] == len(RECOVERING)
    assert c["users_unresolved_placeholder"] == 4  # not found, no email, down, legacy id
    assert per_user(fake) == {
        **{workos_id: 2 for workos_id in RECOVERING},
        "user_not_found": 1,
        "user_no_email": 1,
        "user_always_down": 5,
    }
    users = {u["workos_id"]: u for u in rows(sqlite_url, "users")}
    for workos_id in RECOVERING:
        assert users[workos_id]["email"] == workos_body(workos_id)["email"], workos_id
        assert users[workos_id]["name"] == f"Resolved {workos_id}"
    for workos_id in ("user_not_found", "user_no_email", "user_always_down", "legacy_not_workos"):
        assert PLACEHOLDER.fullmatch(users[workos_id]["email"]), workos_id
    assert users["user_has_email"]["email"] == "kept@example.com"

    # Retry-After: the retry waited the second it asked for; the timeout took the client's 10 s.
    first, second = sorted(fake.requests_to(user_path("user_retry_after")), key=lambda r: r.started)
    assert second.started - first.finished >= 0.9
    first, second = sorted(fake.requests_to(user_path("user_timeout")), key=lambda r: r.started)
    assert 9.5 <= second.started - first.started <= 30

    # The failure is logged by id, with the reason; no email and no key anywhere.
    assert re.search(
        r"WARNING processors\.workos: WorkOS lookup unresolved: workos_id=user_always_down "
        r"attempts=5 reason=HTTP 503$",
        result.stderr,
        re.M,
    ), result.stderr
    assert_no_email_or_key(result, [workos_body(i)["email"] for i in ids] + ["kept@example.com"])

    # A re-import answers from the cache: only the user whose look-up failed is asked again.
    fake.requests.clear()
    fake.script(user_path("user_always_down"), *FAILING)
    again = ok(khala(["import-chat", str(export), "--resolve-workos-users"], env))
    assert per_user(fake) == {"user_always_down": 5}
    assert len([r for r in fake.requests if r.path == USERS_PATH]) == 1  # the key check
    assert again.counters["users_resolved_via_workos"] == len(RECOVERING)  # SPEC §8.8
    assert again.counters["users_unresolved_placeholder"] == 4
    assert {u["workos_id"]: u["email"] for u in rows(sqlite_url, "users")} == {
        k: u["email"] for k, u in users.items()
    }


def test_lookups_are_bounded_and_a_429_pauses_every_request(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    ids = [f"user_{n:03d}" for n in range(40)]
    export = users_export(tmp_path / "users.zip", ids)
    with FakeWorkos(api_key=API_KEY, latency=0.15) as fake:
        for workos_id in ids:
            fake.users[workos_id] = workos_body(workos_id)
        fake.script(
            user_path("user_003"),
            Reply(429, {"message": "slow down"}, headers={"Retry-After": "1"}),
        )
        env = workos_env(kafka_bootstrap, topic_prefix, sqlite_url, fake)
        result = ok(khala(["import-chat", str(export), "--resolve-workos-users"], env))
        assert result.counters["users_resolved_via_workos"] == len(ids)
        assert 2 <= fake.max_in_flight <= 8  # concurrent, but never more than 8 at once
        throttled = next(r for r in fake.requests_to(user_path("user_003")))
        started_in_pause = [
            r
            for r in lookups(fake)
            # Slack at the start for requests already past their turn when the 429 landed.
            if throttled.finished + 0.3 < r.started < throttled.finished + 0.9
        ]
        assert started_in_pause == []  # the whole key waited for Retry-After
        assert len(lookups(fake)) == len(ids) + 1


def test_a_401_in_mid_run_stops_with_exit_1_and_a_rerun_resumes(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str, fake: FakeWorkos
) -> None:
    ids = ["user_a", "user_revoked", "user_c"]
    export = users_export(tmp_path / "users.zip", ids)
    for workos_id in ids:
        fake.users[workos_id] = workos_body(workos_id)
    fake.script(user_path("user_revoked"), Reply(401, {"code": "unauthorized"}))
    env = workos_env(kafka_bootstrap, topic_prefix, sqlite_url, fake)
    stopped = khala(
        ["import-chat", str(export), "--resolve-workos-users", "--retry-deadline", "20"], env
    )
    assert stopped.exit_code == 1, stopped.stdout + stopped.stderr
    assert "khala-stream: error: WorkOS refused the API key (HTTP 401); fix it and rerun" in (
        stopped.stderr
    )
    assert "Traceback" not in stopped.stderr
    assert counts(sqlite_url)["users"] == 0  # no placeholder was written for anyone
    resumed = ok(khala(["import-chat", str(export), "--resolve-workos-users"], env))
    assert resumed.counters["users_resolved_via_workos"] == 3
    assert sorted(u["email"] for u in rows(sqlite_url, "users")) == sorted(
        workos_body(i)["email"] for i in ids
    )


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_the_cache_survives_a_restart(
    engine: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    fake: FakeWorkos,
) -> None:
    db_url = str(request.getfixturevalue("sqlite_url" if engine == "sqlite" else "pg_url"))
    ids = [f"user_{n:02d}" for n in range(12)]
    export = users_export(tmp_path / "users.zip", ids)
    for workos_id in ids[:-1]:
        fake.users[workos_id] = workos_body(workos_id)  # the last one is a 404
    env = workos_env(kafka_bootstrap, topic_prefix, db_url, fake)
    first = ok(khala(["import-chat", str(export), "--resolve-workos-users"], env))
    assert per_user(fake) == dict.fromkeys(ids, 1)
    (cached,) = run_db(db_url, [sa.text("SELECT count(*) FROM khala_import_workos_cache")])
    assert cached[0][0] == len(ids)
    fake.requests.clear()
    # A new process, a new engine; a replace import and a dry run read the same cache.
    for extra in ([], ["--replace"], ["--dry-run"]):
        again = ok(khala(["import-chat", str(export), "--resolve-workos-users", *extra], env))
        assert again.counters["users_resolved_via_workos"] == len(ids) - 1
        assert again.counters["users_unresolved_placeholder"] == 1
    assert lookups(fake) == []
    assert first.counters["users_resolved_via_workos"] == len(ids) - 1
