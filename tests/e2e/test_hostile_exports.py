"""Issue #6, part 1: hostile and damaged exports through the CLI (SPEC §3.1, §3.2, §8.1-8.3).

Invalid sources exit 2 with `<path>: <reason>` and write nothing anywhere (no Laravel row, no
bookkeeping row, no Kafka message), `--replace` included. Bad lines exit 0: each is reported
as `<entry>:<line>: <reason>` and set aside in the dead-letter topic with its raw bytes, and
the rest is imported. Tolerated oddities (CRLF, BOM, blank lines, duplicates, a table twice)
import exactly the rows the rules say. The builders are in `tests/e2e/corpus.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khala_stream.broker.clients import make_admin, make_consumer
from khala_stream.config import KafkaSettings
from khala_stream.db.importer_tables import IMPORTER_TABLES
from khala_stream.dead_letters import StoredDeadLetter, read_dead_letters
from khala_stream.errors import InvalidExportError
from khala_stream.runtime import end_offsets
from producers.export_reader import (
    DEFAULT_MAX_RATIO,
    RejectedLine,
    SourceDocument,
    open_export,
)
from producers.validation import validate_export
from tests.e2e import corpus
from tests.e2e.harness import LARAVEL_TABLES, CliResult, counts, env_for, khala, ok, rows
from tests.e2e.snapshot import Snapshot, assert_same_tables, table_snapshot

NO_CHAT = "holds none of the chat tables users, threads, runs, messages, receipts"


# --------------------------------------------------------------------------- helpers


def topic_ends(bootstrap: str, prefix: str) -> dict[str, int]:
    """How many messages each topic of this prefix holds (sum of end offsets)."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap)

    async def go() -> dict[str, int]:
        admin = make_admin(kafka)
        await admin.start()
        try:
            names = sorted(t for t in await admin.list_topics() if t.startswith(prefix + "."))
        finally:
            await admin.close()
        consumer = make_consumer(kafka, group_id=None)
        await consumer.start()
        try:
            return {t: sum((await end_offsets(consumer, t)).values()) for t in names}
        finally:
            await consumer.stop()

    return asyncio.run(go())


def dead_letters(bootstrap: str, prefix: str) -> list[StoredDeadLetter]:
    return asyncio.run(
        read_dead_letters(KafkaSettings(bootstrap_servers=bootstrap), f"{prefix}.dead-letters")
    )


def bookkeeping(db_url: str) -> dict[str, int]:
    """Row counts of the importer's own tables (khala_import_*)."""
    return counts(db_url, sorted(IMPORTER_TABLES))


def ts(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, datetime) else str(value)


def no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@dataclass(frozen=True)
class GoodImport:
    """Fixture A imported once into its own SQLite database and topic prefix."""

    bootstrap: str
    prefix: str
    db_url: str
    env: dict[str, str]
    snapshot: Snapshot
    rows: dict[str, int]
    bookkeeping: dict[str, int]
    topics: dict[str, int]


@pytest.fixture(scope="module")
def good_import(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> GoodImport:
    base = tmp_path_factory.mktemp("good-import")
    db_url = f"sqlite+aiosqlite:///{base}/khala.sqlite"
    prefix = f"t_{uuid.uuid4().hex[:8]}"
    env = env_for(kafka_bootstrap, prefix, db_url)
    ok(khala(["import-chat", str(corpus.good_export(base))], env))
    imported = GoodImport(
        bootstrap=kafka_bootstrap,
        prefix=prefix,
        db_url=db_url,
        env=env,
        snapshot=table_snapshot(db_url),
        rows=counts(db_url),
        bookkeeping=bookkeeping(db_url),
        topics=topic_ends(kafka_bootstrap, prefix),
    )
    assert imported.rows["users"] == 1 and imported.rows["messages"] == 2
    assert imported.bookkeeping["khala_import_runs"] == 1
    return imported


# --------------------------------------------------------------------------- invalid sources

INVALID_REASONS: dict[str, str] = {
    "empty-file": r"not a ZIP archive",
    "truncated-zip": r"corrupt ZIP: end of central directory not found \(truncated\?\)",
    "not-a-zip": r"not a ZIP archive",
    "no-chat-tables": re.escape(NO_CHAT),
    "only-folder-entries": re.escape(NO_CHAT),
    "folder-table-is-a-folder": re.escape(NO_CHAT),
    "only-unsafe-names": re.escape(NO_CHAT),
    "decompression-bomb": (
        r"entry users/documents\.jsonl declares a \d+x compression ratio \(limit 200x\);"
        r" refused as a decompression bomb"
    ),
    "corrupt-entry": r"corrupt ZIP: entry messages/documents\.jsonl: .+",
}


@pytest.mark.parametrize("case", sorted(corpus.INVALID_SOURCES))
def test_invalid_source_exits_2_and_writes_nothing(
    case: str, tmp_path: Path, good_import: GoodImport
) -> None:
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    source = corpus.INVALID_SOURCES[case](source_dir)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    before_files = tree(tmp_path)
    expected = re.compile(
        rf"^khala-stream: error: {re.escape(str(source))}: {INVALID_REASONS[case]}\n\Z"
    )
    for args in (
        ["validate", str(source)],
        ["import-chat", str(source)],
        ["import-chat", str(source), "--replace"],
        ["import-chat", str(source), "--replace", "--dry-run"],
    ):
        result = khala(args, good_import.env, cwd=workdir)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        assert expected.match(result.stderr), (args, result.stderr)
        assert result.stdout == "", (args, result.stdout)
    # Nothing written anywhere: Laravel rows (--replace truncated nothing), bookkeeping rows,
    # Kafka messages, files (no entry was ever extracted, wherever its name pointed).
    assert table_snapshot(good_import.db_url) == good_import.snapshot
    assert counts(good_import.db_url) == good_import.rows
    assert bookkeeping(good_import.db_url) == good_import.bookkeeping
    assert topic_ends(good_import.bootstrap, good_import.prefix) == good_import.topics
    assert tree(tmp_path) == before_files
    assert not Path("/etc/runs").exists()


def test_decompression_limits_are_configurable_in_the_reader(tmp_path: Path) -> None:
    """The CLI uses the defaults (8 GiB per entry, 200x); the reader API takes both limits."""
    bomb = corpus.decompression_bomb(tmp_path)
    with zipfile.ZipFile(bomb) as archive:
        info = archive.getinfo("users/documents.jsonl")
    ratio = info.file_size / info.compress_size
    assert ratio > DEFAULT_MAX_RATIO
    with pytest.raises(InvalidExportError, match="refused as a decompression bomb"):
        open_export(bomb)
    with pytest.raises(InvalidExportError, match="refused as a decompression bomb"):
        validate_export(bomb)
    with open_export(bomb, max_ratio=ratio * 2) as export:  # a higher ratio allowed on request
        items = list(export.iter_table("users"))
    assert [type(i) for i in items] == [SourceDocument]
    report = validate_export(bomb, max_ratio=ratio * 2)
    assert report.tables["users"].documents == 1
    # A size limit refuses even a well-compressed entry once it inflates past it.
    with pytest.raises(InvalidExportError, match=r"declares \d+ bytes \(limit 1048576\); refused"):
        open_export(bomb, max_ratio=ratio * 2, max_entry_bytes=2**20)
    good = corpus.good_export(tmp_path)
    with pytest.raises(InvalidExportError, match="users/documents.jsonl declares"):
        open_export(good, max_entry_bytes=16)


# --------------------------------------------------------------------------- bad lines


def test_bad_lines_are_reported_set_aside_with_their_bytes_and_the_rest_imported(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = corpus.bad_lines(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    expected = [(n, raw, reason) for n, (raw, reason) in enumerate(corpus.BAD_LINES, start=3)]

    checked = ok(khala(["validate", str(export)], env))
    assert "  messages    2 documents, 8 rejected" in checked.stdout
    for n, _, reason in expected:
        assert re.search(
            rf"^messages/documents\.jsonl:{n}: {re.escape(reason)}", checked.stdout, re.M
        )
    report = orjson.loads(ok(khala(["validate", "--json", str(export)], env)).stdout)
    assert report["rejected_total"] == 8 and report["documents"] == 8
    assert [(r["entry"], r["line"]) for r in report["rejected"]] == [
        ("messages/documents.jsonl", n) for n, _, _ in expected
    ]

    result = ok(khala(["import-chat", str(export)], env))
    no_traceback(result)
    assert "  rejected lines: 8 (set aside in the dead-letter topic)" in result.stdout
    for n, _, reason in expected:
        assert re.search(
            rf"^    messages/documents\.jsonl:{n}: {re.escape(reason)}", result.stdout, re.M
        ), reason
    assert result.counters["source_messages"] == 2
    assert result.counters["messages_imported"] == 2
    assert counts(sqlite_url) == {
        "users": 1,
        "threads": 1,
        "runs": 1,
        "messages": 2,
        "run_events": 1,
        "agent_conversations": 1,
        "agent_conversation_messages": 2,
        "autopilots": 1,
        "autopilot_profiles": 1,
        "autopilot_policies": 1,
    }
    letters = sorted(dead_letters(kafka_bootstrap, topic_prefix), key=lambda s: s.letter.line or 0)
    assert [(s.letter.entry, s.letter.line, s.letter.raw) for s in letters] == [
        ("messages/documents.jsonl", n, raw) for n, raw, _ in expected
    ]
    assert all(s.letter.stage == "publish" and s.letter.run_id == 1 for s in letters)
    assert [s.letter.reason_code for s in letters] == [
        "invalid_utf8",
        "invalid_json",
        "not_object",
        "not_object",
        "not_object",
        "not_object",
        "not_object",
        "invalid_json",
    ]
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"invalid_utf8": 1, "invalid_json": 2, "not_object": 5}


def test_a_line_of_several_megabytes(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = corpus.huge_lines(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    checked = ok(khala(["validate", str(export)], env))
    assert "messages/documents.jsonl:3: invalid JSON: unexpected end of data" in checked.stdout
    result = khala(["import-chat", str(export)], env)
    no_traceback(result)
    ok(result)
    assert "messages/documents.jsonl:3: invalid JSON: unexpected end of data" in result.stdout
    (message,) = [m for m in rows(sqlite_url, "messages") if m["id"] == corpus.MESSAGE_2]
    assert message["content"] == corpus.huge_text()
    (letter,) = dead_letters(kafka_bootstrap, topic_prefix)
    assert letter.letter.line == 3 and len(letter.letter.raw) > 3 * 2**20
    assert letter.letter.raw.startswith(b'{"messageId": "')


def test_wrong_field_types(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """Numbers for string ids (set aside: missing_key), numeric-string timestamps (usable),
    nulls and objects where strings belong (missing), nested nulls kept by value."""
    export = corpus.wrong_types(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    result = ok(khala(["import-chat", str(export)], env))
    no_traceback(result)
    assert "  documents without a key: 2 (set aside in the dead-letter topic)" in result.stdout
    c = result.counters
    assert (c["source_users"], c["users_imported"], c["users_unresolved_placeholder"]) == (4, 3, 2)
    assert (c["source_threads"], c["threads_imported"]) == (4, 1)
    assert (c["source_messages"], c["messages_imported"], c["events_imported"]) == (3, 2, 1)

    users = {u["workos_id"]: u for u in rows(sqlite_url, "users")}
    assert sorted(users) == ["userlegacy1", "usernulls", "userobject"]
    legacy = users["userlegacy1"]
    assert (ts(legacy["created_at"]), legacy["email"]) == (
        "2025-01-01 02:53:20",  # "1735700000000" is usable
        "legacy@example.com",
    )
    for workos_id in ("usernulls", "userobject"):
        assert re.fullmatch(r"migrated\+[0-9a-f]{20}@openagents\.local", users[workos_id]["email"])
        assert ts(users[workos_id]["created_at"]) == "2025-01-02 00:00:00"  # snapshot time
    (thread,) = rows(sqlite_url, "threads")
    assert (ts(thread["created_at"]), ts(thread["updated_at"])) == (
        "2025-01-01 02:53:21",
        "2025-01-01 02:53:22",  # "1735700002999.9": fraction dropped, then floored
    )
    first, second = rows(sqlite_url, "messages")
    assert ts(first["updated_at"]) == ts(first["created_at"]) == "2025-01-01 02:53:25"
    assert second["content"] == ""  # text 42 is not a string
    (event,) = rows(sqlite_url, "run_events")
    assert ts(event["created_at"]) == "2025-01-01 02:53:41"  # from _creationTime
    assert orjson.loads(event["payload"])["json"] == {
        "nested": {"deeper": None, "list": [None, {}]}
    }
    (profile,) = rows(sqlite_url, "autopilot_profiles", "autopilot_id")
    assert orjson.loads(profile["principles"]) == ["ok"]  # non-strings in coreTruths dropped

    letters = sorted(dead_letters(kafka_bootstrap, topic_prefix), key=lambda s: s.letter.location)
    assert [(s.letter.reason_code, s.letter.location, s.letter.raw) for s in letters] == [
        (
            "missing_key",
            "threads/documents.jsonl:3",
            b'{"_id":"threads:num","threadId":42,"ownerId":"userlegacy1"}',
        ),
        (
            "missing_key",
            "users/documents.jsonl:2",
            b'{"_id":"users:2","userId":12345,"email":"number-id@example.com"}',
        ),
    ]
    assert letters[1].letter.reason == "no string 'userId': the document cannot be identified"


def test_missing_key_location_names_the_real_entry(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = corpus.write_zip(
        tmp_path / "prefixed.zip",
        [
            ("export-2026/users/documents.jsonl", b'{"userId": 7}\n'),
            ("export-2026/threads/documents.jsonl", b""),
        ],
    )
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    ok(khala(["import-chat", str(export)], env))
    (letter,) = dead_letters(kafka_bootstrap, topic_prefix)
    assert letter.letter.location == "export-2026/users/documents.jsonl:1"


@pytest.mark.postgres
def test_ids_longer_than_their_columns_are_refused_by_postgresql(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    export = corpus.long_ids(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    result = ok(khala(["import-chat", str(export)], env))
    no_traceback(result)
    assert "  rows refused by the database: 5 (see `khala-stream dlq list`)" in result.stdout
    too_long = "value too long for type character varying"
    for table in ("threads", "agent_conversations", "messages", "agent_conversation_messages"):
        assert f"    {table} {corpus.LONG_ID}: {too_long}(36)" in result.stdout
    assert f"    users {corpus.LONG_USER_ID}: {too_long}(255)" in result.stdout
    # Refused rows still count as imported (SPEC §8.12); the rest of each batch is written.
    c = result.counters
    assert (c["users_imported"], c["threads_imported"], c["messages_imported"]) == (2, 2, 3)
    assert counts(pg_url) | {"autopilots": 0} == {
        "users": 1,
        "threads": 1,
        "runs": 1,
        "messages": 2,
        "run_events": 1,
        "agent_conversations": 1,
        "agent_conversation_messages": 2,
        "autopilots": 0,
        "autopilot_profiles": 1,
        "autopilot_policies": 1,
    }
    letters = dead_letters(kafka_bootstrap, topic_prefix)
    found = sorted((s.letter.table, s.letter.location) for s in letters)
    assert found == [
        ("agent_conversation_messages", "messages/documents.jsonl:3"),
        ("agent_conversations", "threads/documents.jsonl:3"),
        ("messages", "messages/documents.jsonl:3"),
        ("threads", "threads/documents.jsonl:3"),
        ("users", "users/documents.jsonl:2"),
    ]
    assert {s.letter.reason_code for s in letters} == {"db_refused"}
    listed = orjson.loads(ok(khala(["dlq", "list", "--json"], env)).stdout)
    assert listed["by_reason"] == {"db_refused": 5}


# --------------------------------------------------------------------------- tolerated


@pytest.mark.parametrize("case", ["crlf", "bom", "empty_lines", "unsafe_names_beside_good_tables"])
def test_tolerated_oddities_import_the_same_rows_as_the_clean_export(
    case: str,
    tmp_path: Path,
    kafka_bootstrap: str,
    topic_prefix: str,
    sqlite_url: str,
    good_import: GoodImport,
) -> None:
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    export = getattr(corpus, case)(source_dir)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    checked = ok(khala(["validate", str(export)], env, cwd=workdir))
    assert "Rejected lines: 0" in checked.stdout
    before = tree(source_dir)
    result = ok(khala(["import-chat", str(export)], env, cwd=workdir))
    no_traceback(result)
    assert "rejected lines" not in result.stdout
    assert_same_tables(good_import.snapshot, table_snapshot(sqlite_url), case)
    assert dead_letters(kafka_bootstrap, topic_prefix) == []
    assert tree(source_dir) == before and tree(workdir) == []
    if case == "unsafe_names_beside_good_tables":
        ids = {m["id"] for m in rows(sqlite_url, "messages")}
        assert corpus.EVIL_MESSAGE_ID not in ids
        assert "user_evil" not in {u["workos_id"] for u in rows(sqlite_url, "users")}


def test_duplicate_documents_last_line_wins_entirely(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = corpus.duplicates(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    result = ok(khala(["import-chat", str(export)], env))
    c = result.counters
    # source_* counts parsed lines; the earlier versions have no other effect (SPEC §8.2).
    assert (c["source_users"], c["source_threads"], c["source_messages"]) == (2, 3, 3)
    assert (c["users_imported"], c["threads_imported"], c["messages_imported"]) == (1, 1, 2)
    (user,) = rows(sqlite_url, "users")
    # The second line has no createdAtMs and no _creationTime: the snapshot time, not the
    # first line's createdAtMs.
    assert (user["email"], user["name"], ts(user["created_at"])) == (
        "second-version@example.com",
        "second-version",
        "2025-01-02 00:00:00",
    )
    (thread,) = rows(sqlite_url, "threads")
    assert (thread["title"], ts(thread["created_at"])) == ("Second version.", "2025-01-01 02:53:21")
    first = next(m for m in rows(sqlite_url, "messages") if m["id"] == corpus.MESSAGE_1)
    assert first["content"] == "Second version."
    assert ts(first["updated_at"]) == ts(first["created_at"])  # no updatedAtMs any more
    assert counts(sqlite_url)["agent_conversation_messages"] == 2


def test_a_table_present_twice_the_later_zip_entry_wins(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = corpus.table_twice(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    report = orjson.loads(ok(khala(["validate", "--json", str(export)], env)).stdout)
    assert report["tables"]["users"] == {
        "entry": "a-new/users/documents.jsonl",
        "documents": 1,
        "rejected": 0,
        "missing_key": 0,
    }
    ok(khala(["import-chat", str(export)], env))
    (user,) = rows(sqlite_url, "users")
    assert user["email"] == "from-a-prefix@example.com"


def test_an_export_whose_chat_tables_are_empty_imports_nothing(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    export = corpus.empty_chat_tables(tmp_path)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    result = ok(khala(["import-chat", str(export)], env))
    assert set(result.counters.values()) == {0} and len(result.counters) == 22
    assert "  rows written: none (nothing changed)" in result.stdout
    assert counts(sqlite_url) == dict.fromkeys(LARAVEL_TABLES, 0)


# --------------------------------------------------------------------------- fuzzing the CLI


def _corpus_seeds() -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        seeds = []
        for name, build in sorted(corpus.INVALID_SOURCES.items()):
            if name in ("folder-table-is-a-folder", "decompression-bomb"):
                continue
            seeds.append(build(_fresh(Path(tmp), name)).read_bytes())
        for build in (corpus.bad_lines, corpus.wrong_types, corpus.duplicates, corpus.bom):
            seeds.append(build(_fresh(Path(tmp), build.__name__)).read_bytes())
        return seeds


def _fresh(base: Path, name: str) -> Path:
    folder = base / name
    folder.mkdir()
    return folder


SEEDS = _corpus_seeds()
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ENTRY_NAMES = st.sampled_from(
    [
        "users/documents.jsonl",
        "x/threads/documents.jsonl",
        "messages/documents.jsonl",
        "runs/documents.jsonl/",
        "../receipts/documents.jsonl",
        "/abs/users/documents.jsonl",
        "blueprints/documents.jsonl",
        "documents.jsonl",
    ]
)
LINES = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"\r", b"\xef\xbb\xbf{}", b"[]", b"null", b"\xff", b'{"userId": 1}']),
    st.dictionaries(
        st.sampled_from(["userId", "threadId", "ownerId", "messageId", "_id", "text"]),
        st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1), st.none(), st.floats()),
        max_size=4,
    ).map(orjson.dumps),
)
ENTRIES = st.lists(
    st.tuples(ENTRY_NAMES, st.lists(LINES, max_size=12).map(b"\n".join)), max_size=5
).map(corpus.zip_bytes)


@st.composite
def damaged_seed(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([s for s in SEEDS if s])))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def run_cli(*args: str) -> tuple[int, str, str]:
    """`khala-stream ARGS` in this process: an unexpected exception escapes as itself."""
    from khala_app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@FUZZ
@given(st.one_of(damaged_seed(), ENTRIES, st.binary(max_size=512)))
def test_validate_never_tracebacks(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.zip"
        path.write_bytes(data)
        code, out, err = run_cli("validate", "--json", str(path))
        if code == 0:
            report = orjson.loads(out)
            assert report["sha256"] and err == ""
            for rejected in report["rejected"]:
                assert rejected["line"] >= 1 and rejected["reason"]
        else:
            assert code == 2, (code, err)
            assert out == ""
            assert err.startswith(f"khala-stream: error: {path}: ") and err.count("\n") == 1


@FUZZ
@given(st.lists(LINES, max_size=30).map(b"\n".join))
def test_reader_sees_every_line_of_a_folder_export(content: bytes) -> None:
    """A folder export never fails on content: every non-blank line is a document or a
    rejection with its number (SPEC §8.1), exactly as `validate` counts them."""
    with tempfile.TemporaryDirectory() as tmp:
        root = corpus.write_folder(Path(tmp) / "export", {"users/documents.jsonl": content})
        with open_export(root) as export:
            items = list(export.iter_table("users"))
        code, out, _ = run_cli("validate", "--json", str(root))
    assert code == 0
    report = orjson.loads(out)
    documents = [i for i in items if isinstance(i, SourceDocument)]
    rejected = [i for i in items if isinstance(i, RejectedLine)]
    assert report["tables"]["users"]["documents"] == len(documents)
    assert [r["line"] for r in report["rejected"]] == [r.line for r in rejected]
