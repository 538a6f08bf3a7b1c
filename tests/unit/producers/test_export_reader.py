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
from khala_stream.contract.documents import document_hash
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


# --------------------------------------------------------------------------- nesting


def nested(levels: int, *, key: str = "meta") -> bytes:
    """A document whose `key` nests objects and arrays so the line nests `levels` deep."""
    inner = b"1"
    for level in range(levels - 1):  # the line's own object is the last level
        inner = b"[" + inner + b"]" if level % 2 else b'{"x":' + inner + b"}"
    return b'{"_id":"d","userId":"user_1","messageId":"m","' + key.encode() + b'":' + inner + b"}"


def depth_of(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("table", ["users", "messages"])
@pytest.mark.parametrize("levels", [65, 300, 900, 1100])
def test_a_document_nested_too_deep_is_a_rejected_line(
    tmp_path: Path, table: str, levels: int
) -> None:
    """Issue 22 item 1: refused by the reader with its reason, never an error while hashing
    (orjson encodes 254 levels at most, and decodes 1,024)."""
    line = nested(levels)
    good = b'{"_id":"ok","userId":"user_2","messageId":"n"}'
    items = one_table(tmp_path, good + b"\n" + line + b"\n", table)
    (kept,) = docs(items)
    (bad,) = rejected(items)
    assert (kept.line, bad.line, bad.raw) == (1, 2, line)
    assert bad.reason == f"nested deeper than {reader.MAX_DEPTH} levels" == reader.TOO_DEEP
    assert reason_code(bad) == "too_deep"


def test_a_document_nested_to_the_limit_is_kept_and_can_be_hashed(tmp_path: Path) -> None:
    line = nested(reader.MAX_DEPTH)
    (doc,) = docs(one_table(tmp_path, line + b"\n"))
    assert depth_of(doc.doc) == reader.MAX_DEPTH
    # What the product does with a document: hash it, and embed it a few levels deeper.
    assert len(document_hash(doc.doc)) == 64
    orjson.dumps({"values": {"payload": {"json": doc.doc}}})


@pytest.mark.parametrize(
    "document",
    [
        {"messageId": "m\u0000x"},  # a key: PostgreSQL text cannot store it
        {"messageId": "m", "text": "a\u0000b"},
        {"messageId": "m", "meta": {"k\u0000": 1}},  # a field name, nested
        {"messageId": "m", "meta": [["\u0000"]]},
    ],
)
def test_a_document_holding_nul_is_a_rejected_line(
    tmp_path: Path, document: dict[str, object]
) -> None:
    line = orjson.dumps(document)
    assert b"\\u0000" in line
    (bad,) = rejected(one_table(tmp_path, line + b"\n", "messages"))
    assert bad.reason == "holds a NUL character (\\u0000), which PostgreSQL cannot store"
    assert reason_code(bad) == "holds_nul"


def test_an_escaped_backslash_before_u0000_is_no_nul(tmp_path: Path) -> None:
    line = orjson.dumps({"messageId": "m", "text": "C:\\u0000"})
    assert b"\\\\u0000" in line
    (doc,) = docs(one_table(tmp_path, line + b"\n", "messages"))
    assert doc.doc["text"] == "C:\\u0000"


def test_brackets_inside_strings_are_not_nesting(tmp_path: Path) -> None:
    line = orjson.dumps({"userId": "user_1", "text": "[{" * 500})
    (doc,) = docs(one_table(tmp_path, line + b"\n"))
    assert doc.doc["text"] == "[{" * 500


# --------------------------------------------------------------------------- folders


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_mode_one_nested_export(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write(root / "export-2026" / "users" / "documents.jsonl", b'{"nested": true}\n')
    write(root / "export-2026" / "threads" / "documents.jsonl", b'{"b": 1}\n')
    write(root / "export-2026" / "messageParts" / "documents.jsonl", b"{}\n")
    write(root / "documents.jsonl", b"{}\n")  # at the root: no table
    write(root / "README.md", b"hi")
    (root / "export-2026" / "runs" / "documents.jsonl").mkdir(parents=True)  # not a file
    with open_export(root) as source:
        assert source.kind == "folder"
        assert source.tables == {
            "messageParts": "export-2026/messageParts/documents.jsonl",
            "threads": "export-2026/threads/documents.jsonl",
            "users": "export-2026/users/documents.jsonl",
        }
        assert [d.doc for d in docs(list(source.iter_table("users")))] == [{"nested": True}]
        items = list(source.iter_table("threads"))
        assert isinstance(items[0], SourceDocument) and items[0].line == 1


@pytest.mark.parametrize(
    ("layout", "named", "one"),
    [
        (["a/users", "b/threads"], "a, b", "b"),  # two exports side by side
        (["users", "threads", "backup/users"], "., backup", "backup"),  # a copy inside
        (["users", "a/users", "z/threads"], "., a, z", "z"),
    ],
)
def test_a_folder_with_more_than_one_export_is_refused(
    tmp_path: Path, layout: list[str], named: str, one: str
) -> None:
    """Issue 22 item 7: no silent pick of the first one found; each export is named."""
    root = tmp_path / "export"
    for table in layout:
        write(root / table / "documents.jsonl", b'{"userId": "u"}\n')
    with pytest.raises(InvalidExportError) as exc:
        open_export(root)
    assert reason_of(exc) == f"holds more than one export ({named}); give the folder of one of them"
    with open_export(root / one) as source:  # the folder of one of them opens
        assert source.kind == "folder" and len(source.tables) == 1


def test_other_tables_beside_the_export_do_not_count_as_a_second_export(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write(root / "users" / "documents.jsonl", b'{"userId": "u"}\n')
    write(root / "_components" / "x" / "lightningInvoices" / "documents.jsonl", b"{}\n")
    with open_export(root) as source:
        assert set(source.tables) == {"users", "lightningInvoices"}


@pytest.mark.parametrize(
    "link",
    [
        "users/documents.jsonl",  # a table file pointing out of the export
        "threads",  # a table folder pointing out of the export
        "users/inside.jsonl",  # even a link that stays inside, to a file never read
    ],
)
def test_symbolic_links_in_a_folder_export_are_refused(tmp_path: Path, link: str) -> None:
    """Issue 22 item 7: a link may lead anywhere (another user's file, a device, a table of
    another export); an export unpacked from a ZIP holds none, so every link is refused."""
    outside = tmp_path / "outside"
    write(outside / "documents.jsonl", b'{"userId": "secret"}\n')
    root = tmp_path / "export"
    write(root / "messages" / "documents.jsonl", b'{"messageId": "m"}\n')
    (root / "users").mkdir()
    target = outside / "documents.jsonl"
    if link == "threads":
        target = outside
    elif link == "users/inside.jsonl":
        target = root / "messages" / "documents.jsonl"
    os.symlink(target, root / link)
    with pytest.raises(InvalidExportError) as exc:
        open_export(root)
    assert reason_of(exc) == f"{link} is a symbolic link; a folder export must hold its own files"


def test_a_table_file_swapped_for_a_link_after_opening_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "export"
    table = write(root / "users" / "documents.jsonl", b'{"userId": "u"}\n')
    secret = write(tmp_path / "secret.jsonl", b'{"userId": "secret"}\n')
    with open_export(root) as source:
        table.unlink()
        os.symlink(secret, table)
        with pytest.raises(InvalidExportError, match="cannot read users/documents.jsonl"):
            list(source.iter_table("users"))


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


BLANK_MIB = b" " * (2**20 - 1) + b"\n"  # a MiB of blank line: deflates about 1000x


def test_compression_ratio_bomb_is_refused(tmp_path: Path) -> None:
    """A large entry (past RATIO_FROM_BYTES) with a bomb's ratio is refused up front."""
    path = make_zip(tmp_path / "bomb.zip", {"users/documents.jsonl": BLANK_MIB * 72})
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
        {"users/documents.jsonl": b"{}\n", "messageParts/documents.jsonl": BLANK_MIB * 72},
    )
    with open_export(path) as source:
        assert source.has_table("messageParts")
        with pytest.raises(InvalidExportError, match="messageParts/documents.jsonl"):
            list(source.iter_table("messageParts"))


def test_a_compressible_line_of_a_few_mib_is_no_bomb(tmp_path: Path) -> None:
    """Issue 22 item 6: one 8 MiB line of repetitive text (about 400x) is a document."""
    text = "all work and no play " * (8 * 2**20 // 21)
    line = orjson.dumps({"userId": "user_1", "bio": text})
    path = make_zip(tmp_path / "e.zip", {"users/documents.jsonl": line + b"\n"})
    info = zipfile.ZipFile(path).getinfo("users/documents.jsonl")
    assert info.file_size > 8 * 2**20 - 64
    assert info.file_size / info.compress_size > 2 * reader.DEFAULT_MAX_RATIO
    with open_export(path) as source:
        source.verify(["users"])
        (doc,) = docs(list(source.iter_table("users")))
    assert doc.doc["bio"] == text


def test_the_source_tables_together_are_limited_in_inflated_size(tmp_path: Path) -> None:
    """Each entry within its limit, all of them together past the total: refused up front."""
    rows = b'{"a":1}\n' * 1000
    path = make_zip(
        tmp_path / "e.zip",
        {"users/documents.jsonl": rows, "threads/documents.jsonl": rows, "x/documents.jsonl": rows},
    )
    with pytest.raises(InvalidExportError) as exc:
        open_export(path, max_total_bytes=len(rows) * 2 - 1)
    assert reason_of(exc) == (
        f"the source tables declare {len(rows) * 2} bytes in all (limit {len(rows) * 2 - 1});"
        " refused as a decompression bomb"
    )
    with open_export(path, max_total_bytes=len(rows) * 2) as source:  # `x` is no source table
        assert source.has_table("x")


def test_a_folder_export_has_the_same_size_limits(tmp_path: Path) -> None:
    """A sparse table file takes no disk and reads for hours: the limits hold for folders."""
    folder = tmp_path / "export"
    (folder / "users").mkdir(parents=True)
    (folder / "threads").mkdir()
    (folder / "users" / "documents.jsonl").write_bytes(b"")
    os.truncate(folder / "users" / "documents.jsonl", 1 << 40)  # 1 TiB of nothing
    (folder / "threads" / "documents.jsonl").write_bytes(b'{"a":1}\n' * 10)
    with pytest.raises(InvalidExportError) as exc:
        open_export(folder)
    assert (
        reason_of(exc) == f"users/documents.jsonl holds {1 << 40} bytes (limit {8 << 30}); refused"
    )
    os.truncate(folder / "users" / "documents.jsonl", 100)
    with pytest.raises(InvalidExportError) as exc:
        open_export(folder, max_total_bytes=109)
    assert reason_of(exc) == "the source tables hold 180 bytes in all (limit 109); refused"
    with open_export(folder, max_total_bytes=180) as source:
        assert source.kind == "folder"


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
