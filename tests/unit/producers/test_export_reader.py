"""The export reader, rule by rule (reference §1.1–1.2, SPEC §3.1, §8.1, §8.3)."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

import producers.export_reader as reader
from khala_stream.errors import InvalidExportError
from producers.export_reader import ExportSource, RejectedLine, SourceDocument, open_export
from producers.publisher import reason_code

WHEN = (2025, 1, 2, 3, 4, 6)


def make_zip(
    path: Path,
    entries: dict[str, bytes] | list[tuple[str, bytes]],
    *,
    compression: int = zipfile.ZIP_DEFLATED,
    date_time: tuple[int, int, int, int, int, int] = WHEN,
) -> Path:
    items = entries.items() if isinstance(entries, dict) else entries
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in items:
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.compress_type = compression
            archive.writestr(info, data)
    return path


def one_table(
    tmp_path: Path, content: bytes, table: str = "users"
) -> list[SourceDocument | RejectedLine]:
    path = make_zip(tmp_path / "export.zip", {f"{table}/documents.jsonl": content})
    with open_export(path) as source:
        return list(source.iter_table(table))


def docs(items: list[SourceDocument | RejectedLine]) -> list[SourceDocument]:
    return [item for item in items if isinstance(item, SourceDocument)]


def rejected(items: list[SourceDocument | RejectedLine]) -> list[RejectedLine]:
    return [item for item in items if isinstance(item, RejectedLine)]


def reason_of(exc: pytest.ExceptionInfo[InvalidExportError]) -> str:
    return exc.value.reason


# --------------------------------------------------------------------------- lines


def test_lines_split_on_lf_with_physical_line_numbers(tmp_path: Path) -> None:
    items = one_table(tmp_path, b'{"a":1}\n{"a":2}\n{"a":3}')  # the last line has no LF
    assert [(d.line, d.doc) for d in docs(items)] == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3})]
    assert all(isinstance(item, SourceDocument) and item.table == "users" for item in items)


def test_crlf_drops_the_cr_from_raw(tmp_path: Path) -> None:
    items = one_table(tmp_path, b'{"a":1}\r\n{"a":2}\r\n')
    assert [(d.line, d.raw) for d in docs(items)] == [(1, b'{"a":1}'), (2, b'{"a":2}')]


def test_a_lone_cr_is_not_a_line_break(tmp_path: Path) -> None:
    items = one_table(tmp_path, b'{"a":1}\r{"a":2}\n')
    assert len(items) == 1
    assert isinstance(items[0], RejectedLine)
    assert items[0].reason.startswith("invalid JSON: ")


def test_bom_at_start_of_file_is_dropped(tmp_path: Path) -> None:
    items = one_table(tmp_path, b'\xef\xbb\xbf{"a":1}\n{"a":2}\n')
    assert [(d.line, d.raw, d.doc) for d in docs(items)] == [
        (1, b'{"a":1}', {"a": 1}),
        (2, b'{"a":2}', {"a": 2}),
    ]


def test_bom_later_in_the_file_is_not_dropped(tmp_path: Path) -> None:
    items = one_table(tmp_path, b'{"a":1}\n\xef\xbb\xbf{"a":2}\n')
    assert isinstance(items[1], RejectedLine) and items[1].line == 2


def test_u2028_and_u2029_inside_strings_are_not_line_breaks(tmp_path: Path) -> None:
    text = "one\u2028two\u2029three"
    content = orjson.dumps({"text": text}) + b"\n" + orjson.dumps({"n": 2}) + b"\n"
    assert "\u2028".encode() in content
    items = one_table(tmp_path, content)
    assert [(d.line, d.doc) for d in docs(items)] == [(1, {"text": text}), (2, {"n": 2})]


def test_blank_and_whitespace_lines_are_skipped_but_numbered(tmp_path: Path) -> None:
    content = b'\n  \n\t\r\n{"a":1}\n\r\n \x0b\x0c \n{"a":2}\n\n'
    items = one_table(tmp_path, content)
    assert [(item.line, type(item).__name__) for item in items] == [
        (4, "SourceDocument"),
        (7, "SourceDocument"),
    ]


def test_non_ascii_whitespace_is_not_blank(tmp_path: Path) -> None:
    items = one_table(tmp_path, "\u00a0\n\u3000\n".encode())
    assert [(r.line, r.reason[:12]) for r in rejected(items)] == [
        (1, "invalid JSON"),
        (2, "invalid JSON"),
    ]


def test_each_rejection_reason(tmp_path: Path) -> None:
    content = b"\n".join(
        [
            b'{"ok": true}',
            b'{"bad": "\xff"}',
            b'{"a": ',
            b"[1, 2]",
            b'"text"',
            b"42",
            b"-1.5e3",
            b"true",
            b"false",
            b"null",
            b"{} {}",
        ]
    )
    items = one_table(tmp_path, content)
    assert [item.line for item in items] == list(range(1, 12))
    reasons = [(r.line, r.reason) for r in rejected(items)]
    assert reasons[0] == (2, "invalid UTF-8")
    assert reasons[1][0] == 3 and reasons[1][1].startswith("invalid JSON: unexpected end of data")
    assert reasons[2:9] == [
        (4, "not a JSON object (array)"),
        (5, "not a JSON object (string)"),
        (6, "not a JSON object (number)"),
        (7, "not a JSON object (number)"),
        (8, "not a JSON object (boolean)"),
        (9, "not a JSON object (boolean)"),
        (10, "not a JSON object (null)"),
    ]
    assert reasons[9][0] == 11 and reasons[9][1].startswith("invalid JSON: ")


def test_rejected_line_keeps_raw_bytes_and_location(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "e.zip", {"dump/messages/documents.jsonl": b"{}\n[1]\r\n"})
    with open_export(path) as source:
        items = list(source.iter_table("messages"))
    assert items[1] == RejectedLine(
        table="messages",
        entry="dump/messages/documents.jsonl",
        line=2,
        raw=b"[1]",
        reason="not a JSON object (array)",
    )


def test_lone_surrogate_escape_is_invalid_json_not_invalid_utf8(tmp_path: Path) -> None:
    items = one_table(tmp_path, b'{"a": "\\ud800"}\n')
    assert rejected(items)[0].reason.startswith("invalid JSON: ")


def test_a_multi_megabyte_line_is_read_whole(tmp_path: Path) -> None:
    big = os.urandom(3 * 2**20).hex()  # 6 MiB of text that does not compress much
    content = b'{"a":1}\n' + orjson.dumps({"text": big}) + b"\n" + b'{"a":3}\n'
    items = one_table(tmp_path, content)
    assert [d.line for d in docs(items)] == [1, 2, 3]
    assert docs(items)[1].doc["text"] == big


def test_100k_empty_lines(tmp_path: Path) -> None:
    items = one_table(tmp_path, b"\n" * 100_000 + b'{"a":1}\n' + b"\r\n" * 100_000)
    assert [(d.line, d.doc) for d in docs(items)] == [(100_001, {"a": 1})]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 64])
def test_split_lines_across_chunk_boundaries(chunk: int) -> None:
    content = b'{"a":1}\r\n\n\nxy\r\n' + b"z" * 17 + b"\n\n"
    got = list(reader._split_lines(io.BytesIO(content), chunk))
    assert got == content.split(b"\n")[:-1]


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 64])
def test_a_line_past_the_limit_comes_out_cut_with_its_length(chunk: int) -> None:
    content = b"abcd\n" + b"x" * 9 + b"\nefgh\n" + b"y" * 6
    got = list(reader._split_lines(io.BytesIO(content), chunk, max_line=5))
    assert got[0] == b"abcd" and got[2] == b"efgh"
    for cut, size, start in ((got[1], 9, b"x"), (got[3], 6, b"y")):
        assert isinstance(cut, reader._Overlong) and cut.size == size
        assert cut.head.startswith(start) and 5 <= len(cut.head) < size + chunk


def test_an_overlong_line_is_rejected_with_its_place_and_the_rest_read(tmp_path: Path) -> None:
    huge = b'{"userId":"' + b"u" * reader.MAX_LINE_BYTES + b'"}'
    folder = tmp_path / "export" / "users"  # a folder: as a ZIP, the line is a bomb's ratio
    folder.mkdir(parents=True)
    (folder / "documents.jsonl").write_bytes(b'{"userId":"a"}\n' + huge + b'\n{"userId":"b"}\n')
    with open_export(tmp_path / "export") as source:
        items = list(source.iter_table("users"))
    assert [d.doc["userId"] for d in docs(items)] == ["a", "b"]
    (cut,) = rejected(items)
    assert (cut.entry, cut.line) == ("users/documents.jsonl", 2)
    assert cut.reason.startswith(f"line too long: {len(huge):,} bytes, more than the 32 MiB")
    assert cut.raw == huge[: len(cut.raw)] and len(cut.raw) == 2**20
    assert reason_code(cut) == "too_long"  # its dead letter's code


def test_each_kind_of_rejected_line_has_its_dead_letter_code() -> None:
    content = b'\xff\n{"a":\n[1]\n' + b"z" * 9 + b"\n"
    lines = list(reader._parse_lines("users", "users/documents.jsonl", io.BytesIO(content)))
    assert [reason_code(r) for r in lines if isinstance(r, RejectedLine)] == [
        "invalid_utf8",
        "invalid_json",
        "not_object",
        "invalid_json",
    ]


def test_memory_does_not_grow_with_table_size(tmp_path: Path) -> None:
    row = orjson.dumps({"text": "x" * 100, "n": 1})
    folder = tmp_path / "export" / "messages"
    folder.mkdir(parents=True)
    with (folder / "documents.jsonl").open("wb") as handle:
        for _ in range(200_000):  # about 23 MB
            handle.write(row + b"\n")
    with open_export(tmp_path / "export") as source:
        tracemalloc.start()
        try:
            count = sum(1 for _ in source.iter_table("messages"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == 200_000
    assert peak < 8 * 2**20


# --------------------------------------------------------------------------- tables


def test_table_discovery_in_a_zip(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "e.zip",
        [
            ("README.md", b"hello"),
            ("documents.jsonl", b'{"root": true}\n'),  # no table segment
            ("export-2026/users/documents.jsonl", b'{"first": true}\n'),
            ("threads/documents.jsonl", b'{"t": 1}\n'),
            ("Runs/documents.jsonl", b'{"r": 1}\n'),  # case-sensitive: not "runs"
            ("a/b/messageParts/documents.jsonl", b"{}\n"),
            ("users/generated_schema.jsonl", b"{}\n"),
            ("x//documents.jsonl", b"{}\n"),  # empty table segment
            ("later/users/documents.jsonl", b'{"second": true}\n'),  # later entry wins
        ],
    )
    with open_export(path) as source:
        assert source.kind == "zip"
        assert source.tables == {
            "threads": "threads/documents.jsonl",
            "Runs": "Runs/documents.jsonl",
            "messageParts": "a/b/messageParts/documents.jsonl",
            "users": "later/users/documents.jsonl",
        }
        assert source.has_table("users") and not source.has_table("runs")
        assert [d.doc for d in docs(list(source.iter_table("users")))] == [{"second": True}]
        assert list(source.iter_table("runs")) == []
        assert list(source.iter_table("blueprints")) == []


def test_unsafe_and_directory_names_are_never_tables(tmp_path: Path) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("threads/documents.jsonl", b"{}\n")
        archive.writestr("../users/documents.jsonl", b'{"evil": 1}\n')
        archive.writestr("a/../../runs/documents.jsonl", b'{"evil": 2}\n')
        archive.writestr("/abs/messages/documents.jsonl", b'{"evil": 3}\n')
        archive.writestr("..\\receipts/documents.jsonl", b'{"evil": 4}\n')
        archive.writestr("C:/x/blueprints/documents.jsonl", b'{"evil": 5}\n')
        archive.mkdir("users/documents.jsonl")  # a directory entry named like a table file
        dir_flagged = zipfile.ZipInfo("runs/documents.jsonl", date_time=WHEN)
        dir_flagged.external_attr = 0x10  # MS-DOS directory bit
        archive.writestr(dir_flagged, b"")
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with open_export(path) as source:
        assert source.tables == {"threads": "threads/documents.jsonl"}
        for table in ("threads", "users", "runs", "messages", "receipts", "blueprints"):
            list(source.iter_table(table))
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


def test_zip_metadata_sha256_and_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "e.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("users/documents.jsonl", (2025, 1, 1, 0, 0, 0)), b"{}\n")
        archive.writestr(zipfile.ZipInfo("threads/documents.jsonl", WHEN), b"{}\n")
        archive.writestr(zipfile.ZipInfo("README.md", (2030, 1, 1, 0, 0, 0)), b"newer, not a table")
    with open_export(str(path)) as source:
        assert source.path == path
        assert source.size_bytes == path.stat().st_size
        assert source.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert source.sha256() is source.sha256()  # cached
        expected = datetime(*WHEN, tzinfo=UTC).timestamp() * 1000
        assert source.snapshot_ms == int(expected)


def test_context_manager_closes_the_zip(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "e.zip", {"users/documents.jsonl": b"{}\n"})
    with open_export(path) as source:
        assert isinstance(source, ExportSource)
    with pytest.raises(ValueError, match="closed"):
        list(source.iter_table("users"))


def test_stored_and_deflated_entries_read_the_same(tmp_path: Path) -> None:
    content = b'{"a":1}\n{"b":2}\n'
    for n, method in enumerate(
        (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
    ):
        path = make_zip(
            tmp_path / f"{n}.zip", {"users/documents.jsonl": content}, compression=method
        )
        with open_export(path) as source:
            assert [d.doc for d in docs(list(source.iter_table("users")))] == [{"a": 1}, {"b": 2}]


# --------------------------------------------------------------------------- folders


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_mode_direct_and_nested_tables(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write(root / "users" / "documents.jsonl", b'{"direct": true}\n')
    write(root / "a" / "users" / "documents.jsonl", b'{"nested": true}\n')
    write(root / "z" / "threads" / "documents.jsonl", b'{"z": 1}\n')
    write(root / "b" / "threads" / "documents.jsonl", b'{"b": 1}\n')
    write(root / "documents.jsonl", b"{}\n")  # at the root: no table
    write(root / "README.md", b"hi")
    (root / "runs" / "documents.jsonl").mkdir(parents=True)  # a folder, not a file
    with open_export(root) as source:
        assert source.kind == "folder"
        # The direct path wins; otherwise the first match in sorted path order.
        assert source.tables == {
            "threads": "b/threads/documents.jsonl",
            "users": "users/documents.jsonl",
        }
        assert [d.doc for d in docs(list(source.iter_table("users")))] == [{"direct": True}]
        assert [d.doc for d in docs(list(source.iter_table("threads")))] == [{"b": 1}]
        items = list(source.iter_table("threads"))
        assert isinstance(items[0], SourceDocument) and items[0].line == 1


def test_folder_sha256_size_and_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "export"
    users = write(root / "users" / "documents.jsonl", b'{"a":1}\n')
    threads = write(root / "threads" / "documents.jsonl", b'{"b":2}\n')
    write(root / "notes.txt", b"not part of the fingerprint")
    os.utime(users, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789))
    os.utime(threads, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    with open_export(root) as source:
        first = source.sha256()
        assert source.size_bytes == 16
        assert source.snapshot_ms == 1_700_000_000_123
    write(root / "notes.txt", b"changed")
    with open_export(root) as source:
        assert source.sha256() == first
    write(root / "threads" / "documents.jsonl", b'{"b":3}\n')
    with open_export(root) as source:
        assert source.sha256() != first
    assert len(first) == 64


# --------------------------------------------------------------------------- invalid sources


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidExportError) as exc:
        open_export(tmp_path / "nope.zip")
    assert reason_of(exc) == "does not exist"
    assert exc.value.exit_code == 2
    assert exc.value.path == str(tmp_path / "nope.zip")


def test_not_a_zip(tmp_path: Path) -> None:
    path = write(tmp_path / "export.zip", b'{"users": []}\n')
    with pytest.raises(InvalidExportError) as exc:
        open_export(path)
    assert reason_of(exc) == "not a ZIP archive"


def test_empty_file_is_not_a_zip(tmp_path: Path) -> None:
    with pytest.raises(InvalidExportError, match="not a ZIP archive"):
        open_export(write(tmp_path / "empty.zip", b""))


def test_truncated_zip(tmp_path: Path) -> None:
    good = make_zip(tmp_path / "good.zip", {"users/documents.jsonl": b'{"a":1}\n' * 1000})
    cut = write(tmp_path / "cut.zip", good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InvalidExportError) as exc:
        open_export(cut)
    assert reason_of(exc).startswith("corrupt ZIP: ")


def test_corrupt_entry_data_fails_while_reading(tmp_path: Path) -> None:
    rows = b'{"a":1}\n' * 50_000
    path = make_zip(
        tmp_path / "e.zip", {"users/documents.jsonl": rows}, compression=zipfile.ZIP_STORED
    )
    data = bytearray(path.read_bytes())
    data[data.index(rows) + len(rows) - 100] = ord("X")  # near the end: the CRC no longer matches
    path.write_bytes(bytes(data))
    with open_export(path) as source, pytest.raises(InvalidExportError) as exc:
        list(source.iter_table("users"))
    assert reason_of(exc).startswith("corrupt ZIP: entry users/documents.jsonl: ")


def test_empty_zip(tmp_path: Path) -> None:
    path = tmp_path / "empty.zip"
    zipfile.ZipFile(path, "w").close()
    with pytest.raises(InvalidExportError) as exc:
        open_export(path)
    assert reason_of(exc) == (
        "holds none of the chat tables users, threads, runs, messages, receipts"
    )


def test_zip_without_chat_tables(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "e.zip",
        {"messageParts/documents.jsonl": b"{}\n", "blueprints/documents.jsonl": b"{}\n"},
    )
    with pytest.raises(InvalidExportError, match="holds none of the chat tables"):
        open_export(path)


def test_folder_without_chat_tables(tmp_path: Path) -> None:
    write(tmp_path / "x" / "lightningInvoices" / "documents.jsonl", b"{}\n")
    with pytest.raises(InvalidExportError, match="holds none of the chat tables"):
        open_export(tmp_path / "x")
    with pytest.raises(InvalidExportError, match="holds none of the chat tables"):
        open_export(tmp_path / "x" / "lightningInvoices")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_neither_file_nor_folder(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(InvalidExportError, match="neither a file nor a folder"):
        open_export(fifo)


# --------------------------------------------------------------------------- bombs


def test_declared_size_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "e.zip", {"users/documents.jsonl": b'{"a":1}\n' * 1000})
    with pytest.raises(InvalidExportError) as exc:
        open_export(path, max_entry_bytes=4096)
    assert "users/documents.jsonl" in reason_of(exc)
    assert "refused" in reason_of(exc)


def test_compression_ratio_bomb_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "bomb.zip", {"users/documents.jsonl": b" " * (16 * 2**20)})
    info = zipfile.ZipFile(path).getinfo("users/documents.jsonl")
    assert info.file_size / info.compress_size > 200
    with pytest.raises(InvalidExportError) as exc:
        open_export(path)
    assert "users/documents.jsonl" in reason_of(exc)
    assert "decompression bomb" in reason_of(exc)
    with open_export(path, max_ratio=10_000.0) as source:  # allowed when asked for
        assert list(source.iter_table("users")) == []


def test_an_ignored_table_is_checked_when_read(tmp_path: Path) -> None:
    path = make_zip(
        tmp_path / "e.zip",
        {"users/documents.jsonl": b"{}\n", "messageParts/documents.jsonl": b" " * (16 * 2**20)},
    )
    with open_export(path) as source:
        assert source.has_table("messageParts")
        with pytest.raises(InvalidExportError, match="messageParts/documents.jsonl"):
            list(source.iter_table("messageParts"))


def test_inflated_bytes_are_counted_while_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_zip(tmp_path / "e.zip", {"users/documents.jsonl": b'{"a":1}\n' * 2000})
    # Defeat the up-front check to prove the streaming count holds on its own.
    monkeypatch.setattr(reader, "_check_declared", lambda *args: None)
    with (
        open_export(path, max_entry_bytes=5000) as source,
        pytest.raises(InvalidExportError) as exc,
    ):
        list(source.iter_table("users"))
    assert "inflates beyond 5000 bytes" in reason_of(exc)
