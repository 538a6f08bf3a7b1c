"""Issue 22 items 3-5 through the CLI: bad settings, private data in errors, `--replace` guards.

Bad settings exit 2 with one line and no traceback; unreachable services exit 1 with one
error line after the retry deadline; database errors under a broken target schema never print
an email or message text; `--replace` truncates nothing for an export without a document, or
when the WorkOS key is missing or refused, on every path (import-chat, publish, process).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from khala_stream.db.importer_tables import RUNS
from producers.generator import load_reference_fixture, write_fixture_zip
from tests.e2e.harness import CliResult, counts, env_for, khala, ok, rows, run_db
from tests.e2e.test_secrets_and_pii import EXPORT_EMAILS, pii_export
from tests.fakes.workos_server import FakeWorkos

PASSWORD = "Pa55-" + "e9f8d7c6"
CHAT = ("threads", "runs", "messages", "run_events", "agent_conversations")


def _one_error_line(result: CliResult, exit_code: int) -> str:
    """The run's one `khala-stream: ... error:` line; no traceback anywhere."""
    assert result.exit_code == exit_code, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    errors = [line for line in result.stderr.splitlines() if " error: " in line]
    assert len(errors) == 1 and errors[0].startswith("khala-stream"), result.stderr
    assert PASSWORD not in text
    return errors[0]


@pytest.mark.parametrize(
    ("database_url", "args", "expected"),
    [
        ("not a url", ["db", "init"], "DATABASE_URL is not a database URL"),
        (f"mysql://app:{PASSWORD}@127.0.0.1/app", ["db", "init"], "unsupported database"),
        ("sqlite+aiosqlite:////no/such/folder/k.sqlite", ["db", "init"], "does not exist"),
        # was: "created" tables that vanished; import-chat blamed the topics' owner, exit 1
        ("sqlite+aiosqlite://", ["import-chat", "EXPORT"], "in-memory"),
        ("sqlite+aiosqlite:///:memory:", ["db", "init"], "in-memory"),
        # was: exit 1, "unexpected TypeError" (asyncpg.connect() takes no such argument)
        (f"postgresql://a:{PASSWORD}@127.0.0.1/d?foo=1", ["db", "init"], "parameter 'foo'"),
        ("postgresql://a@127.0.0.1/d?sslmode=bogus", ["db", "init"], "sslmode must be one of"),
        ("not a url", ["import-chat", "EXPORT"], "DATABASE_URL is not a database URL"),
        ("not a url", ["dlq", "list"], "DATABASE_URL is not a database URL"),
        (None, ["generate", "--out", "OUT", "--users", "-3"], "argument --users"),
        *(
            (None, ["import-chat", "EXPORT", "--retry-deadline", bad], "--retry-deadline")
            for bad in ("nan", "inf", "-1", "0")
        ),
        (None, ["lag", "--interval", "nan"], "--interval"),  # was: slept forever
        (None, ["--topic-prefix", "a/b", "validate", "EXPORT"], "--topic-prefix"),
        (None, ["--bootstrap-servers", "h:x", "validate", "EXPORT"], "--bootstrap-servers"),
        # Ports past 65535 or 0: were exit 1, "unexpected OverflowError" / ExceptionGroup /
        # InvalidURL at the first connection.
        (None, ["--bootstrap-servers", "127.0.0.1:99999", "lag"], "ports 1 to 65535"),
        ("postgresql://a@127.0.0.1:99999/d", ["status"], "port must be from 1 to 65535"),
        ("postgresql://a@127.0.0.1:0/d", ["db", "init"], "port must be from 1 to 65535"),
        *(
            (None, ["follow", "--deployment", url], "--deployment must be an http(s) URL")
            for url in ("http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://127.0.0.1:0")
        ),
        (None, ["lag", "--watch", "--interval", "inf"], "--interval"),
        (None, ["--database-url", f"postgresql://a:{PASSWORD}@h/d", "db", "init"], "DATABASE_URL"),
        # A global option after the command too (issue 24): refused the same way.
        (None, ["db", "init", "--database-url", f"postgresql://a:{PASSWORD}@h/d"], "DATABASE_URL"),
        (None, ["db", "init", "--bogus", f"postgresql://a:{PASSWORD}@h/d"], "a:***@h/d"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    tmp_path: Path,
    topic_prefix: str,
    database_url: str | None,
    args: list[str],
    expected: str,
) -> None:
    export = tmp_path / "a.zip"
    write_fixture_zip(export, load_reference_fixture("fixture-a"))
    args = [
        str(export) if a == "EXPORT" else str(tmp_path / "g.zip") if a == "OUT" else a for a in args
    ]
    env = env_for(
        "127.0.0.1:9", topic_prefix, database_url or f"sqlite+aiosqlite:///{tmp_path}/k.db"
    )
    result = khala(args, env, cwd=tmp_path, timeout=60)
    line = _one_error_line(result, 2)
    assert expected in line
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "g.zip").exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "host:notaport"),  # was: exit 1, "unexpected ValueError"
        ("KHALA_TOPIC_PREFIX", "bad prefix/x"),  # was: 160,000 log lines, exit 1 after 40 s
        ("WORKOS_BASE_URL", "http://[::1"),  # was: exit 1, "unexpected InvalidURL"
        ("WORKOS_BASE_URL", "not a url"),
        ("WORKOS_BASE_URL", "http://127.0.0.1:70000"),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092,127.0.0.1:99999"),
        ("KHALA_MAX_ENTRY_BYTES", "\u00b2"),
        ("KHALA_RETRY_DEADLINE_SECONDS", "1.5"),
        ("KHALA_TOPIC_PARTITIONS", "-2"),
        ("KHALA_TOPIC_PARTITIONS", "100000"),  # was: the embedded broker stalled
        ("KHALA_RETRY_DEADLINE_SECONDS", "1" + "0" * 400),  # was: exit 1, OverflowError
        ("KHALA_MAX_RATIO", "9" * 400),  # was: exit 1, OverflowError
        ("KHALA_BROKER_IDLE_SECONDS", "9" * 5000),  # int() refuses more than 4,300 digits
    ],
)
def test_a_bad_number_in_the_environment_exits_2_naming_it(
    tmp_path: Path, topic_prefix: str, variable: str, value: str
) -> None:
    export = tmp_path / "a.zip"
    write_fixture_zip(export, load_reference_fixture("fixture-a"))
    env = env_for("127.0.0.1:9", topic_prefix, f"sqlite+aiosqlite:///{tmp_path}/k.db")
    line = _one_error_line(khala(["validate", str(export)], env | {variable: value}), 2)
    assert variable in line


def test_libpq_sslmode_in_database_url_is_asyncpg_ssl(tmp_path: Path, pg_url: str) -> None:
    """`?sslmode=disable`, as libpq and Laravel spell it, was exit 1 "unexpected TypeError"."""
    env = env_for("127.0.0.1:9", "t_sslmode", pg_url + "?sslmode=disable")
    assert "created users" in ok(khala(["db", "init"], env)).stdout


def test_a_broker_home_that_cannot_be_made_exits_2_naming_it(
    tmp_path: Path, topic_prefix: str
) -> None:
    """KHALA_BROKER_HOME under a file: was exit 1, "unexpected NotADirectoryError"."""
    (tmp_path / "a-file").write_bytes(b"")
    env = env_for("127.0.0.1:9", topic_prefix, f"sqlite+aiosqlite:///{tmp_path}/k.db")
    del env["KAFKA_BOOTSTRAP_SERVERS"]  # the embedded broker
    env["KHALA_BROKER_HOME"] = str(tmp_path / "a-file" / "home")
    ok(khala(["db", "init"], env))  # `dlq list` reads a database that exists
    line = _one_error_line(khala(["dlq", "list"], env), 2)
    assert "KHALA_BROKER_HOME" in line


def test_a_bad_inherited_verbosity_is_no_traceback(tmp_path: Path, topic_prefix: str) -> None:
    """KHALA_VERBOSITY passes -v on to import-chat's stage children; a stray value is 0."""
    export = tmp_path / "a.zip"
    write_fixture_zip(export, load_reference_fixture("fixture-a"))
    env = env_for("127.0.0.1:9", topic_prefix, f"sqlite+aiosqlite:///{tmp_path}/k.db")
    ok(khala(["validate", str(export)], env | {"KHALA_VERBOSITY": "abc"}))


@pytest.mark.parametrize(
    "args",
    [
        ["db", "init"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["import-chat", "EXPORT"],
        ["publish", "EXPORT"],
    ],
)
def test_unreachable_database_or_broker_exit_1_with_one_line(
    tmp_path: Path, topic_prefix: str, args: list[str]
) -> None:
    """KHALA_RETRY_DEADLINE_SECONDS holds for every command (import-chat's default too)."""
    export = tmp_path / "a.zip"
    write_fixture_zip(export, load_reference_fixture("fixture-a"))
    args = [str(export) if a == "EXPORT" else a for a in args]
    dead_database = f"postgresql+asyncpg://khala:{PASSWORD}@127.0.0.1:9/laravel"
    env = env_for("127.0.0.1:9", topic_prefix, dead_database, KHALA_RETRY_DEADLINE_SECONDS="1")
    line = _one_error_line(khala(args, env, timeout=60), 1)
    assert "gave up waiting for the database" in line
    if args[0] in ("dlq", "publish"):  # the database is there, the broker is not
        env["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/k.sqlite"
        ok(khala(["db", "init"], env, timeout=60))  # `dlq list` reads a database that exists
        line = _one_error_line(khala(args, env, timeout=60), 1)
        assert "gave up waiting for the broker" in line


def test_no_private_data_in_errors_under_a_broken_schema(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """A dropped column (the sink's write fails as a whole) and a narrowed one (rows are
    refused): no email or message text in any output, log, refusal or dead-letter reason."""
    export = pii_export(tmp_path / "pii.zip")
    env = env_for(kafka_bootstrap, topic_prefix, pg_url, KHALA_RETRY_DEADLINE_SECONDS="5")
    ok(khala(["db", "init"], env))
    run_db(pg_url, [sa.text("ALTER TABLE users ALTER COLUMN email TYPE varchar(12)")])
    results = [ok(khala(["-v", "import-chat", str(export), "--json"], env, timeout=300))]
    assert orjson.loads(results[0].stdout)["refused_rows"]
    results.append(ok(khala(["-v", "dlq", "list", "--json"], env)))
    letters = orjson.loads(results[-1].stdout)
    assert letters["total"] >= 2  # the users whose email no longer fits
    assert any("character varying(12)" in d["reason"] for d in letters["letters"])
    # The messages' text column gone: every write of a message fails, exit 1 in one line.
    run_db(
        pg_url,
        [sa.text("ALTER TABLE messages DROP COLUMN content"), sa.text("DELETE FROM messages")],
    )
    results.append(khala(["-v", "import-chat", str(export), "--json"], env, timeout=300))
    assert results[-1].exit_code == 1, results[-1].stdout + results[-1].stderr
    assert "database error:" in results[-1].stderr
    assert "SQLSTATE 42703" in results[-1].stderr
    refusals = run_db(pg_url, [sa.text("SELECT reason FROM khala_import_refusals")])[0]
    assert refusals
    private = [*EXPORT_EMAILS.values(), "please write to"]
    for result in results:
        text = result.stdout + result.stderr
        assert "Traceback" not in text
        for value in private:
            assert value not in text, text
    for (reason,) in refusals:
        assert not any(value in reason for value in private), reason


# ------------------------------------------------------------------------ --replace guards


def _empty_export(path: Path, blueprints: bytes = b"") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for table in ("users", "threads", "runs", "messages", "receipts"):
            archive.writestr(f"{table}/documents.jsonl", b"")
        archive.writestr("blueprints/documents.jsonl", blueprints)
    return path


def _imported(tmp_path: Path, env: dict[str, str]) -> dict[str, int]:
    export = tmp_path / "a.zip"
    write_fixture_zip(export, load_reference_fixture("fixture-a"))
    ok(khala(["import-chat", str(export)], env))
    return counts(env["DATABASE_URL"], CHAT)


def _runs(db_url: str) -> int:
    return len(run_db(db_url, [sa.select(RUNS.c.id)])[0])


def test_replace_with_an_empty_export_is_refused_unless_allowed(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    before = _imported(tmp_path, env)
    assert before["threads"] and before["messages"] and before["run_events"]
    empty = _empty_export(tmp_path / "empty.zip")
    # Blueprints fill no chat table: an export of blueprints alone is empty for --replace.
    blueprint = orjson.dumps({"_id": "bp1", "userId": "user_1", "blueprint": {}}) + b"\n"
    only_blueprints = _empty_export(tmp_path / "blueprints.zip", blueprint)
    for args in (
        ["import-chat", str(empty), "--replace"],
        ["import-chat", str(empty), "--replace", "--dry-run"],
        ["publish", str(empty), "--replace"],
        ["import-chat", str(only_blueprints), "--replace"],
        ["import-chat", str(only_blueprints), "--replace", "--dry-run"],
        ["publish", str(only_blueprints), "--replace"],
        ["import-chat", str(empty), "--propagate-deletes"],
        ["import-chat", str(empty), "--propagate-deletes", "--dry-run"],
        ["import-chat", str(only_blueprints), "--propagate-deletes"],
    ):
        line = _one_error_line(khala(args, env), 2)
        assert "without a single document" in line and "--allow-empty" in line
        assert ("--replace" if "--replace" in args else "--propagate-deletes") in line
    assert counts(pg_url, CHAT) == before
    assert _runs(pg_url) == 1  # nothing registered either
    # A merge import of it changes nothing and is allowed; --allow-empty empties on purpose.
    ok(khala(["import-chat", str(empty)], env))
    assert counts(pg_url, CHAT) == before
    ok(khala(["import-chat", str(empty), "--replace", "--allow-empty"], env))
    assert counts(pg_url, CHAT) == dict.fromkeys(CHAT, 0)


def test_workos_key_is_checked_before_any_truncation_on_every_path(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    before = _imported(tmp_path, env)
    export = tmp_path / "a.zip"
    with FakeWorkos(api_key="sk_test_right") as fake:
        right = env | {"WORKOS_BASE_URL": fake.base_url, "WORKOS_API_KEY": "sk_test_right"}
        wrong = right | {"WORKOS_API_KEY": "sk_test_wrong"}
        missing = {k: v for k, v in right.items() if k != "WORKOS_API_KEY"}
        for bad in (missing, wrong):
            for command in ("import-chat", "publish"):
                args = [command, str(export), "--replace", "--resolve-workos-users"]
                line = _one_error_line(khala(args, bad), 2)
                assert "WorkOS" in line
        assert _runs(pg_url) == 1
        # The processor: a run published with a good key, processed without one (each new
        # publication supersedes the run the processor refused).
        args = ["publish", str(export), "--replace", "--resolve-workos-users", "--incremental"]
        for bad in (missing, wrong):
            ok(khala(args, right))
            line = _one_error_line(khala(["process", "--until-idle"], bad, timeout=120), 2)
            assert "WorkOS" in line
            ok(khala(["sink", "--until-idle"], bad, timeout=120))
            assert counts(pg_url, CHAT) == before  # nothing truncated
        # --until-idle hands over at the truncation (the processor waits for the sink to
        # apply it before it sends the rows): a second round brings the rows.
        for _ in range(2):
            ok(khala(["process", "--until-idle"], right, timeout=120))
            ok(khala(["sink", "--until-idle"], right, timeout=120))
    assert counts(pg_url, CHAT) == before  # replaced by the same rows
    assert {m["id"] for m in rows(pg_url, "messages")}


def test_an_export_generate_cannot_write_is_one_line_and_exit_1(
    tmp_path: Path, topic_prefix: str
) -> None:
    env = env_for("127.0.0.1:9", topic_prefix, f"sqlite+aiosqlite:///{tmp_path}/k.db")
    # /proc takes no new files: the write fails after the checks (was: exit 1, "unexpected
    # FileNotFoundError").
    result = khala(["generate", "--out", "/proc/khala-x.zip", "--users", "1"], env, cwd=tmp_path)
    line = _one_error_line(result, 1)
    assert "cannot write /proc/khala-x.zip" in line
