"""Issue 22, items 1, 6, 7, 8 and 9: what the reader lets in, through the CLI, against the real
broker and PostgreSQL.

Too deep a document is a rejected line (never a crash while hashing); a compressible entry of a
few MiB is no bomb; a folder holding two exports or a symbolic link is refused; a message
without `messageId` still titles its thread as the reference's title scan says, and `validate`
counts what the import sets aside; names from the export reach the terminal escaped.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from khala_stream.contract.documents import ASCII_TRIM
from producers.export_reader import MAX_DEPTH
from tests.e2e import corpus
from tests.e2e.harness import counts, env_for, khala, ok, rows, run_db
from tests.e2e.test_hostile_exports import dead_letters, no_traceback

FIXTURE_A_ROWS = {
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
CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # anything but \t and \n


def nested(levels: int) -> Any:
    """A value nesting objects and arrays `levels` deep."""
    value: Any = 1
    for level in range(levels):
        value = [value] if level % 2 else {"x": value}
    return value


def deep_line(levels: int, **fields: Any) -> bytes:
    """A document line nesting `levels` deep in all (its `meta` is one level below it)."""
    inner = b"1"
    for level in range(levels - 1):
        inner = b"[" + inner + b"]" if level % 2 else b'{"x":' + inner + b"}"
    return orjson.dumps(fields)[:-1] + b',"meta":' + inner + b"}"


def entries_with(extra: dict[str, list[bytes]]) -> list[tuple[str, bytes]]:
    """Fixture A's entries, with these raw lines appended to their tables."""
    entries = []
    for table, documents in corpus.fixture_tables().items():
        lines = corpus.jsonl(documents) + b"".join(line + b"\n" for line in extra.get(table, []))
        entries.append((f"{table}/documents.jsonl", lines))
    return entries


# --------------------------------------------------------------------------- item 1


@pytest.mark.postgres
def test_documents_nested_too_deep_are_rejected_lines_and_the_rest_imported(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """300 levels (orjson reads it, but cannot encode it again) and 900 levels, in a users
    line and a messages line: before the fix, a TypeError after the run was registered."""
    bad = {
        "users": [deep_line(300, userId="user_deep300"), deep_line(900, userId="user_deep900")],
        "messages": [
            deep_line(300, messageId="m300", threadId=corpus.THREAD, role="user", text="a"),
            deep_line(900, messageId="m900", threadId=corpus.THREAD, role="user", text="b"),
        ],
    }
    export = corpus.write_zip(tmp_path / "deep.zip", entries_with(bad))
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    expected = [
        ("messages/documents.jsonl", 3),
        ("messages/documents.jsonl", 4),
        ("users/documents.jsonl", 2),
        ("users/documents.jsonl", 3),
    ]
    reason = f"nested deeper than {MAX_DEPTH} levels"

    report = orjson.loads(ok(khala(["validate", "--json", str(export)], env)).stdout)
    assert sorted((r["entry"], r["line"], r["reason"]) for r in report["rejected"]) == [
        (entry, line, reason) for entry, line in expected
    ]
    dry = ok(khala(["import-chat", str(export), "--dry-run"], env))
    no_traceback(dry)
    assert (
        "  rejected lines: 4 (a real run would set them aside in the dead-letter topic)"
        in dry.stdout
    )

    result = khala(["import-chat", str(export)], env)
    no_traceback(result)
    ok(result)
    for entry, line in expected:
        assert f"    {entry}:{line}: {reason}" in result.stdout
    assert counts(pg_url) == FIXTURE_A_ROWS
    letters = sorted(
        (s.letter.entry or "", s.letter.line or 0, s.letter.reason_code, s.letter.raw)
        for s in dead_letters(kafka_bootstrap, topic_prefix)
    )
    raw = {("users", 2): bad["users"][0], ("users", 3): bad["users"][1]}
    raw |= {("messages", 3): bad["messages"][0], ("messages", 4): bad["messages"][1]}
    assert letters == [
        (entry, line, "too_deep", raw[(entry.split("/")[0], line)]) for entry, line in expected
    ]


@pytest.mark.postgres
def test_a_document_holding_nul_is_a_rejected_line_not_a_stopped_processor(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """Before: a messageId holding U+0000 stopped the processor on every rerun (PostgreSQL
    text cannot store it: the document store's COPY failed)."""
    line = orjson.dumps(
        {"_id": "messages:nul", "messageId": "m\u0000x", "threadId": corpus.THREAD,
         "role": "user", "text": "t", "createdAtMs": 1}
    )  # fmt: skip
    export = corpus.write_zip(tmp_path / "nul.zip", entries_with({"messages": [line]}))
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    result = khala(["import-chat", str(export)], env)
    no_traceback(result)
    ok(result)
    reason = "holds a NUL character (\\u0000), which PostgreSQL cannot store"
    assert f"    messages/documents.jsonl:3: {reason}" in result.stdout
    assert counts(pg_url) == FIXTURE_A_ROWS
    (letter,) = dead_letters(kafka_bootstrap, topic_prefix)
    assert (letter.letter.reason_code, letter.letter.raw) == ("holds_nul", line)


# --------------------------------------------------------------------------- item 6


@pytest.mark.postgres
def test_a_compressible_line_of_8_mib_imports(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """One 8 MiB line of repetitive text in the users table (deflates ~400x): a document, not
    a decompression bomb. A real bomb (a large inflated size) stays refused: see
    test_hostile_exports' invalid sources."""
    tables = corpus.fixture_tables()
    tables["users"][0]["bio"] = "all work and no play " * (8 * 2**20 // 21)
    export = corpus.write_zip(tmp_path / "compressible.zip", corpus._entries(tables))
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    checked = ok(khala(["validate", str(export)], env))
    assert "Rejected lines: 0" in checked.stdout
    # What refuses a bomb is inflated size: the limit on all source tables together, here.
    small = khala(["validate", str(export)], env | {"KHALA_MAX_TOTAL_BYTES": str(2**20)})
    assert small.exit_code == 2
    assert small.stderr.endswith(f"(limit {2**20}); refused as a decompression bomb\n")
    result = ok(khala(["import-chat", str(export)], env))
    no_traceback(result)
    assert result.counters["users_imported"] == 1
    assert counts(pg_url) == FIXTURE_A_ROWS
    assert dead_letters(kafka_bootstrap, topic_prefix) == []


# --------------------------------------------------------------------------- item 7


def _refused_everywhere(source: Path, reason: str, env: dict[str, str], db_url: str) -> None:
    for args in (["validate", str(source)], ["import-chat", str(source)]):
        result = khala(args, env)
        assert (result.exit_code, result.stdout) == (2, ""), (args, result.stderr)
        assert result.stderr == f"khala-stream: error: {source}: {reason}\n"
    (runs,) = run_db(db_url, [sa.text("SELECT count(*) FROM khala_import_runs")])
    assert runs[0][0] == 0


@pytest.mark.postgres
def test_a_folder_holding_two_exports_exits_2_naming_both(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    root = tmp_path / "exports"
    for name in ("export-2026-01", "export-2026-02"):
        corpus.write_folder(root / name, dict(corpus._entries(corpus.fixture_tables())))
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["db", "init"], env))
    reason = "holds more than one export (export-2026-01, export-2026-02); give the folder of one"
    _refused_everywhere(root, reason + " of them", env, pg_url)
    assert counts(pg_url) == dict.fromkeys(FIXTURE_A_ROWS, 0)
    ok(khala(["import-chat", str(root / "export-2026-02")], env))  # one of them imports
    assert counts(pg_url) == FIXTURE_A_ROWS


@pytest.mark.postgres
def test_a_symlinked_table_file_is_refused(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """The link points out of the export, at another export's users: never followed."""
    elsewhere = corpus.write_folder(tmp_path / "elsewhere", {"users/documents.jsonl": b"{}\n"})
    entries = dict(corpus._entries(corpus.fixture_tables()))
    del entries["users/documents.jsonl"]
    root = corpus.write_folder(tmp_path / "export", entries)
    (root / "users").mkdir()
    os.symlink(elsewhere / "users" / "documents.jsonl", root / "users" / "documents.jsonl")
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    ok(khala(["db", "init"], env))
    reason = "users/documents.jsonl is a symbolic link; a folder export must hold its own files"
    _refused_everywhere(root, reason, env, pg_url)
    assert counts(pg_url) == dict.fromkeys(FIXTURE_A_ROWS, 0)


# --------------------------------------------------------------------------- item 8


def reference_title(messages: list[dict[str, Any]], thread_id: str) -> str:
    """The reference's title scan (reference §3.2), transcribed: every message row, keyed or
    not; eligible with a `threadId`, role `user` and non-blank text; the strictly smallest
    `createdAtMs` (missing: last), ties to the first in file order."""
    best: tuple[float, str] | None = None
    for row in messages:
        text, created = row.get("text"), row.get("createdAtMs")
        if row.get("threadId") != thread_id or row.get("role") != "user":
            continue
        if not isinstance(text, str) or not text.strip(ASCII_TRIM):
            continue
        key = created if isinstance(created, int) else math.inf
        if best is None or key < best[0]:
            best = (key, text)
    if best is None:
        return f"Conversation {thread_id[:8]}"
    title = " ".join(best[1].split())
    assert len(title) <= 120  # the test's texts stay short of the cut
    return title


@pytest.mark.postgres
def test_a_keyless_message_titles_its_thread_as_the_reference_does(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    tables = corpus.fixture_tables()
    first = tables["messages"][0]["createdAtMs"]
    # The earliest eligible message of the thread, without its key; a keyed one at the same
    # time after it, then the first one again (the tie goes to the first line).
    k1 = {
        "_id": "messages:k1",
        "threadId": corpus.THREAD,
        "role": "user",
        "text": "  Plan   the\tmigration\n weekend ",
        "createdAtMs": first - 2000,
    }
    tie = {
        "_id": "messages:tie",
        "threadId": corpus.THREAD,
        "role": "user",
        "messageId": "55555555-5555-5555-5555-555555555555",
        "text": "Keyed, at the same time",
        "createdAtMs": first - 2000,
    }
    keyless = [
        k1,
        tie,
        k1,
        # Earlier still, but not eligible: an assistant's, and a blank one.
        {"_id": "messages:k2", "threadId": corpus.THREAD, "role": "assistant",
         "text": "Hello", "createdAtMs": first - 5000},
        {"_id": "messages:k3", "threadId": corpus.THREAD, "role": "user",
         "text": " \t", "createdAtMs": first - 6000, "messageId": 7},
    ]  # fmt: skip
    tables["messages"] = keyless + tables["messages"]
    rows_now = FIXTURE_A_ROWS | {"messages": 3, "agent_conversation_messages": 3}
    export = corpus.write_zip(tmp_path / "keyless.zip", corpus._entries(tables))
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)

    result = ok(khala(["import-chat", str(export)], env))
    no_traceback(result)
    expected = reference_title(tables["messages"], corpus.THREAD)
    assert expected == "Plan the migration weekend"
    (thread,) = rows(pg_url, "threads")
    (conversation,) = rows(pg_url, "agent_conversations")
    assert thread["title"] == conversation["title"] == expected
    # Still set aside as rows: no message row, reported, in the dead-letter topic.
    assert counts(pg_url) == rows_now
    assert result.counters["source_messages"] == 7
    assert result.counters["messages_imported"] == 3
    assert "  documents without a key: 4 (set aside in the dead-letter topic)" in result.stdout
    assert "  documents messages: inserted=3 updated=0 unchanged=0 not_in_export=0" in result.stdout
    letters = dead_letters(kafka_bootstrap, topic_prefix)
    assert sorted((s.letter.reason_code, s.letter.line) for s in letters) == [
        ("missing_key", 1),
        ("missing_key", 3),
        ("missing_key", 4),
        ("missing_key", 5),
    ]

    # The same export again changes nothing; a newer one without the keyless line takes the
    # title back to the keyed message, and deletes nothing with --propagate-deletes.
    again = ok(khala(["import-chat", str(export)], env))
    assert "  rows written: none (nothing changed)" in again.stdout
    tables["messages"] = [m for m in tables["messages"] if m is not k1]
    newer = corpus.write_zip(tmp_path / "newer.zip", corpus._entries(tables))
    third = ok(khala(["import-chat", str(newer), "--propagate-deletes"], env))
    assert "  documents messages: inserted=0 updated=0 unchanged=3 not_in_export=0" in third.stdout
    (thread,) = rows(pg_url, "threads")
    assert thread["title"] == reference_title(tables["messages"], corpus.THREAD)
    assert thread["title"] == "Keyed, at the same time"
    assert counts(pg_url) == rows_now


@pytest.mark.postgres
def test_validate_and_the_import_set_aside_the_same_documents(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, pg_url: str
) -> None:
    """Rejected lines and documents without their key, in several tables: before the fix,
    validate counted only the rejected lines."""
    bad = {
        "users": [b'{"_id":"users:2","userId":12345}', b"[1]"],
        "threads": [b'{"_id":"threads:2","ownerId":"userlegacy1"}'],
        "messages": [
            b'{"_id":"messages:9","threadId":"%s","role":"user","text":"x"}'
            % corpus.THREAD.encode(),
            *[line for line, _ in corpus.BAD_LINES],
        ],
    }
    export = corpus.write_zip(tmp_path / "set-aside.zip", entries_with(bad))
    env = env_for(kafka_bootstrap, topic_prefix, pg_url)
    checked = orjson.loads(ok(khala(["validate", "--json", str(export)], env)).stdout)
    assert (checked["rejected_total"], checked["missing_key_total"]) == (9, 3)
    assert checked["set_aside"] == 12
    text = ok(khala(["validate", str(export)], env)).stdout
    assert "Set aside by an import: 12 (in the dead-letter topic)" in text

    dry = ok(khala(["import-chat", str(export), "--dry-run", "--json"], env))
    result = ok(khala(["import-chat", str(export), "--json"], env))
    tables = checked["tables"]
    for report in (orjson.loads(dry.stdout), orjson.loads(result.stdout)):
        rejected = report["rejected_lines"]["per_table"]
        assert rejected == {t: n["rejected"] for t, n in tables.items() if n["rejected"]}
        keyless = report["missing_key"]
        assert keyless == {t: n["missing_key"] for t, n in tables.items() if n["missing_key"]}
    assert len(dead_letters(kafka_bootstrap, topic_prefix)) == checked["set_aside"]


# --------------------------------------------------------------------------- item 9


def test_names_from_the_export_are_printed_escaped(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, sqlite_url: str
) -> None:
    """An entry prefix and a table name with terminal control sequences in them: every printed
    line shows them escaped (validate, import-chat, dlq list, the error line)."""
    prefix = "x\x1b]0;owned\x07\r/"
    entries = [(prefix + name, data) for name, data in entries_with({"messages": [b"[1]"]})]
    entries.append(("\x1b[2Jwipe\u202e/documents.jsonl", b"{}\n"))
    export = corpus.write_zip(tmp_path / "names.zip", entries)
    env = env_for(kafka_bootstrap, topic_prefix, sqlite_url)
    shown = "x\\x1b]0;owned\\x07\\x0d/messages/documents.jsonl:3: not a JSON object (array)"

    checked = ok(khala(["validate", str(export)], env))
    assert shown in checked.stdout.splitlines()
    assert "Ignored tables: \\x1b[2Jwipe\\u202e" in checked.stdout
    result = ok(khala(["import-chat", str(export)], env))
    assert "    " + shown in result.stdout.splitlines()
    listed = ok(khala(["dlq", "list"], env))
    assert any(line.startswith("  " + shown + " [") for line in listed.stdout.splitlines())
    for output in (checked, result, listed):
        assert not CONTROLS.search(output.stdout + output.stderr)
        assert "\u202e" not in output.stdout
    # The reader still imported the export under its odd prefix.
    assert counts(sqlite_url)["messages"] == 2

    two = tmp_path / "two"
    for name in ("a\x1b[31m", "b"):
        corpus.write_folder(two / name, {"users/documents.jsonl": b"{}\n"})
    refused = khala(["validate", str(two)], env)
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"khala-stream: error: {two}: holds more than one export (a\\x1b[31m, b);"
        " give the folder of one of them\n"
    )
