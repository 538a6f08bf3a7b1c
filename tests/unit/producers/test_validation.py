"""`validate_export`: what the `validate` command reports (SPEC §2, §3.2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from khala_stream.errors import InvalidExportError
from producers.generator import generate_export, load_reference_fixture, write_fixture_zip
from producers.validation import RejectedRecord, TableReport, validate_export


def test_fixture_a_counts(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    write_fixture_zip(path, load_reference_fixture("fixture-a"))
    report = validate_export(path)
    assert report.kind == "zip"
    assert report.size_bytes == path.stat().st_size
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {name: (t.documents, t.rejected) for name, t in report.tables.items()} == {
        "users": (1, 0),
        "threads": (2, 0),
        "runs": (1, 0),
        "messages": (2, 0),
        "receipts": (1, 0),
        "blueprints": (1, 0),
    }
    assert list(report.tables) == ["users", "threads", "runs", "messages", "receipts", "blueprints"]
    assert report.ignored_tables == []
    assert report.rejected == []
    assert report.documents == 8


def test_rejected_lines_are_listed_with_location_and_reason(tmp_path: Path) -> None:
    root = tmp_path / "export"
    (root / "users").mkdir(parents=True)
    (root / "users" / "documents.jsonl").write_bytes(b'{"userId":"u1"}\n\n[1]\n{"x":\n')
    (root / "messages").mkdir(parents=True)
    (root / "messages" / "documents.jsonl").write_bytes(b'"s"\r\n{"m":1}\n')
    (root / "messageParts").mkdir()
    (root / "messageParts" / "documents.jsonl").write_bytes(b"garbage that is never read\n")
    report = validate_export(root)
    assert report.kind == "folder"
    assert report.tables == {
        "users": TableReport(entry="users/documents.jsonl", documents=1, rejected=2),
        "messages": TableReport(
            entry="messages/documents.jsonl", documents=1, rejected=1, missing_key=1
        ),
    }
    assert report.ignored_tables == ["messageParts"]
    assert report.rejected[0] == RejectedRecord(
        table="users", entry="users/documents.jsonl", line=3, reason="not a JSON object (array)"
    )
    assert (report.rejected[1].line, report.rejected[1].reason[:14]) == (4, "invalid JSON: ")
    assert report.rejected[2] == RejectedRecord(
        table="messages",
        entry="messages/documents.jsonl",
        line=1,
        reason="not a JSON object (string)",
    )

    lines = report.lines()
    assert lines[1] == f"Size: {report.size_bytes} bytes"
    assert lines[2] == f"sha256: {report.sha256}"
    assert "  users     1 documents, 2 rejected, 0 without a key" in lines
    assert "  messages  1 documents, 1 rejected, 1 without a key" in lines
    assert "Set aside by an import: 4 (in the dead-letter topic)" in lines
    assert "users/documents.jsonl:3: not a JSON object (array)" in lines
    assert lines[-1] == "messages/documents.jsonl:1: not a JSON object (string)"
    assert lines.index("users/documents.jsonl:3: not a JSON object (array)") > lines.index(
        "Rejected lines: 3"
    )

    data = report.to_json()
    encoded = orjson.dumps(data)  # JSON-safe: no bytes anywhere
    assert b"garbage" not in encoded and b'"s"' not in encoded
    assert data["tables"]["users"] == {
        "entry": "users/documents.jsonl",
        "documents": 1,
        "rejected": 2,
        "missing_key": 0,
    }
    assert (data["missing_key_total"], data["set_aside"]) == (1, 4)
    assert data["rejected"][0] == {
        "table": "users",
        "entry": "users/documents.jsonl",
        "line": 3,
        "reason": "not a JSON object (array)",
    }
    assert data["rejected_total"] == 3 and data["documents"] == 2
    assert data["ignored_tables"] == ["messageParts"]
    assert data["kind"] == "folder" and data["sha256"] == report.sha256


def test_rejected_listing_is_capped_but_counts_stay_exact(tmp_path: Path) -> None:
    root = tmp_path / "export"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "documents.jsonl").write_bytes(b"[]\n" * 25)
    report = validate_export(root, rejected_limit=10)
    assert report.tables["runs"].rejected == 25
    assert len(report.rejected) == 10 and report.rejected_omitted == 15
    assert report.lines()[-1] == "... and 15 more rejected lines"


def test_generated_export_validates_to_its_own_counts(tmp_path: Path) -> None:
    made = generate_export(tmp_path / "g.zip", users=6, seed=3, edge_cases=True)
    report = validate_export(made.path)
    for table, tr in report.tables.items():
        assert tr.documents == made.counts[table]
        assert tr.rejected == made.malformed[table]
    assert report.ignored_tables == ["_tables", "lightningInvoices", "messageParts"]
    assert report.snapshot_ms is not None


@pytest.mark.parametrize("content", [None, b"not a zip"])
def test_invalid_sources_raise(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.zip"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidExportError) as exc:
        validate_export(path)
    assert exc.value.exit_code == 2


def test_limits_are_passed_through(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    write_fixture_zip(path, load_reference_fixture("fixture-a"))
    with pytest.raises(InvalidExportError, match="refused"):
        validate_export(path, max_entry_bytes=10)
