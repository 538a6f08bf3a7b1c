"""Issue #6, part 5: no secret and no personal data in flags, logs, errors or --json output.

Every run below captures stdout and stderr with `-v` (the product's own INFO logs) and greps
them for the WorkOS API key, the database and SASL passwords, and every email of the fixture
(from the export and from WorkOS). Log lines about users name them by id. `-vv` (debug, which
turns on the libraries' debug logs too) is checked separately.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from khala_app.cli import _parser
from producers.generator import write_fixture_zip
from tests.e2e.harness import CliResult, env_for, khala, ok, rows
from tests.fakes.workos_server import FakeWorkos, Reply, user_path

API_KEY = "sk_live_" + "5ecret0" * 6
DB_PASSWORD = "Db-Pa55-" + "0a1b2c3d"
SASL_PASSWORD = "Sasl-Pa55-" + "4e5f6a7b"
THREAD = "11111111-1111-1111-1111-111111111111"
EXPORT_EMAILS = {
    "userlegacy1": "legacy.person@pii-export.example.com",
    "user_with_email": "grace.hopper@pii-export.example.com",
}
WORKOS_EMAILS = {
    "user_resolved": "ada.lovelace@pii-workos.example.com",
    "user_revoked": "alan.turing@pii-workos.example.com",
}
ALL_EMAILS = [*EXPORT_EMAILS.values(), *WORKOS_EMAILS.values()]
SECRETS = [API_KEY, DB_PASSWORD, SASL_PASSWORD]


def pii_export(path: Path) -> Path:
    users: list[dict[str, Any]] = [
        {"_id": "users:1", "userId": "userlegacy1", "email": EXPORT_EMAILS["userlegacy1"]},
        {"_id": "users:2", "userId": "user_with_email", "email": EXPORT_EMAILS["user_with_email"]},
        {"_id": "users:3", "userId": "user_resolved", "email": ""},
        {"_id": "users:4", "userId": "user_unresolved", "email": None},
        {"_id": "users:5", "userId": "user_revoked", "email": "   "},
    ]
    threads: list[dict[str, Any]] = [
        {"_id": f"threads:{n}", "threadId": f"{n}1111111-1111-1111-1111-111111111111", "ownerId": u}
        for n, u in enumerate(["userlegacy1", "user_with_email", "user_resolved"], start=1)
    ]
    messages: list[dict[str, Any]] = [
        {
            "_id": "messages:1",
            "threadId": threads[0]["threadId"],
            "messageId": "33333333-3333-3333-3333-333333333333",
            "role": "user",
            "text": f"please write to {EXPORT_EMAILS['userlegacy1']}",
        }
    ]
    write_fixture_zip(path, {"users": users, "threads": threads, "messages": messages})
    return path


def assert_clean(result: CliResult, *, allowed: tuple[str, ...] = ()) -> None:
    text = result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in text, f"secret leaked:\n{text}"
    for email in ALL_EMAILS:
        if email not in allowed:
            assert email not in text, f"{email} leaked:\n{_around(text, email)}"


def _around(text: str, needle: str) -> str:
    at = text.find(needle)
    return text[max(0, at - 600) : at + 200]


def workos_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "WorkOS" in line and "user_" in line]


def test_no_secret_or_email_in_any_output(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = pii_export(tmp_path / "pii.zip")
    with FakeWorkos(api_key=API_KEY) as fake:
        for workos_id, email in WORKOS_EMAILS.items():
            fake.users[workos_id] = {"email": email, "first_name": "Pii", "last_name": "Person"}
        failing = [Reply(503, {"message": "down"}, headers={"Retry-After": "0"})] * 5
        fake.script(user_path("user_unresolved"), *failing)
        env = env_for(
            kafka_bootstrap,
            topic_prefix,
            sqlite_url,
            WORKOS_API_KEY=API_KEY,
            WORKOS_BASE_URL=fake.base_url,
        )
        runs: list[CliResult] = []
        imported = ok(khala(["-v", "import-chat", str(export), "--resolve-workos-users"], env))
        runs.append(imported)
        fake.script(user_path("user_unresolved"), *failing)
        runs.append(
            ok(khala(["-v", "import-chat", str(export), "--resolve-workos-users", "--json"], env))
        )
        runs.append(ok(khala(["-v", "import-chat", str(export), "--dry-run", "--json"], env)))
        for args in (["dlq", "list", "--json"], ["counts", "--json"], ["validate", str(export)]):
            runs.append(ok(khala(["-v", *args], env)))
        # A refused key, and a key revoked in mid-run (a fresh database: lookups happen again).
        wrong = {**env, "WORKOS_API_KEY": API_KEY[:-4] + "XXXX"}
        refused = khala(["-v", "import-chat", str(export), "--resolve-workos-users"], wrong)
        assert refused.exit_code == 2
        runs.append(refused)
        fresh = env | {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/fresh.sqlite"}
        fresh["KHALA_TOPIC_PREFIX"] = topic_prefix + "_revoked"
        fake.script(user_path("user_revoked"), Reply(401, {"code": "unauthorized"}))
        revoked = khala(["-v", "import-chat", str(export), "--resolve-workos-users"], fresh)
        assert revoked.exit_code == 1, revoked.stdout + revoked.stderr
        runs.append(revoked)
    for result in runs:
        assert_clean(result)
    # The data did arrive: the emails are in the database, just never in the output.
    assert {u["email"] for u in rows(sqlite_url, "users")} >= {
        *EXPORT_EMAILS.values(),
        WORKOS_EMAILS["user_resolved"],
    }
    # Users appear in logs by id: the failed look-up names user_unresolved and nothing else.
    lines = workos_lines(imported.stderr)
    assert any("workos_id=user_unresolved" in line for line in lines), imported.stderr
    for line in lines:
        assert re.search(r"(workos_id|target)=user_\w+", line), line
        assert "@" not in line, line


def test_debug_logs_carry_no_email(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = pii_export(tmp_path / "pii.zip")
    with FakeWorkos(api_key=API_KEY) as fake:
        for workos_id, email in WORKOS_EMAILS.items():
            fake.users[workos_id] = {"email": email, "first_name": "Pii", "last_name": "Person"}
        env = env_for(
            kafka_bootstrap,
            topic_prefix,
            sqlite_url,
            WORKOS_API_KEY=API_KEY,
            WORKOS_BASE_URL=fake.base_url,
        )
        result = ok(khala(["-vv", "import-chat", str(export), "--resolve-workos-users"], env))
    assert " DEBUG " in result.stderr
    assert_clean(result)


def test_no_secret_in_connection_errors(tmp_path: Path, topic_prefix: str) -> None:
    """An unreachable database or broker: the error names what failed, not the password."""
    export = pii_export(tmp_path / "pii.zip")
    env = env_for(
        "127.0.0.1:9",
        topic_prefix,
        f"postgresql+asyncpg://khala:{DB_PASSWORD}@127.0.0.1:9/laravel",
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_USERNAME="khala",
        KAFKA_SASL_PASSWORD=SASL_PASSWORD,
        WORKOS_API_KEY=API_KEY,
    )
    result = khala(["-v", "import-chat", str(export), "--retry-deadline", "2"], env, timeout=60)
    assert result.exit_code == 1
    assert "gave up waiting for the database" in result.stderr
    assert_clean(result)
    sqlite_env = env | {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/k.sqlite"}
    result = khala(["-v", "import-chat", str(export), "--retry-deadline", "2"], sqlite_env)
    assert result.exit_code == 1
    assert "gave up waiting for the broker" in result.stderr
    assert_clean(result)


SECRET_WORDS = re.compile(r"pass|secret|token|key|sasl|credential|auth", re.I)


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, (*path, name))
    return found


def test_no_command_takes_a_secret_as_a_flag() -> None:
    parsers = _parsers(_parser())
    names = {" ".join(path) for path, _ in parsers}
    assert {"import-chat", "publish", "process", "sink", "dlq list", "dlq replay"} <= names
    for path, parser in parsers:
        for action in parser._actions:
            for option in action.option_strings:
                assert not SECRET_WORDS.search(option), (path, option)
        assert not re.search(r"--\S*(pass|secret|token|api-key|sasl)", parser.format_help(), re.I)
    # The help of the one flag that needs a secret says where it comes from.
    (_, chat) = next(p for p in parsers if p[0] == ("import-chat",))
    assert "WORKOS_API_KEY" in chat.format_help()
