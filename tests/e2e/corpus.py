"""A corpus of hostile and damaged Khala exports, for the CLI tests (issue #6).

Each builder writes one export (a ZIP, a folder or a plain file) into the directory it is
given and returns its path. Builders are deterministic: fixed ZIP entry times, fixed content,
no randomness, so the same builder always writes the same bytes (and the same sha256).

Most cases start from the reference's fixture A (one user `userlegacy1`, one owned thread,
one anonymous thread, one run, two messages, one receipt, one blueprint) and damage one
thing, so the rows that must still be imported are known exactly.
"""

from __future__ import annotations

import copy
import hashlib
import io
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from producers.generator import load_reference_fixture

__all__ = [
    "BAD_LINES",
    "ENTRY_TIME",
    "EVIL_MESSAGE_ID",
    "HUGE_TEXT_BYTES",
    "INVALID_SOURCES",
    "LONG_ID",
    "LONG_USER_ID",
    "MESSAGE_1",
    "MESSAGE_2",
    "RUN",
    "THREAD",
    "USER",
    "Builder",
    "bad_lines",
    "bom",
    "corrupt_entry",
    "crlf",
    "decompression_bomb",
    "duplicates",
    "empty_chat_tables",
    "empty_file",
    "empty_lines",
    "fixture_tables",
    "folder_table_is_a_folder",
    "good_export",
    "huge_lines",
    "huge_text",
    "jsonl",
    "long_ids",
    "no_chat_tables",
    "not_a_zip",
    "only_folder_entries",
    "only_unsafe_names",
    "table_twice",
    "truncated_zip",
    "unsafe_names_beside_good_tables",
    "write_folder",
    "write_zip",
    "wrong_types",
    "zip_bytes",
]

Builder = Callable[[Path], Path]
ENTRY_TIME: Final = (2025, 1, 2, 0, 0, 0)  # every entry's time: the snapshot time of an export
THREAD: Final = "11111111-1111-1111-1111-111111111111"
RUN: Final = "22222222-2222-2222-2222-222222222222"
MESSAGE_1: Final = "33333333-3333-3333-3333-333333333333"
MESSAGE_2: Final = "44444444-4444-4444-4444-444444444444"
USER: Final = "userlegacy1"
LONG_ID: Final = "5" * 40  # thread and message ids are varchar(36) in Laravel
LONG_USER_ID: Final = "user_" + "x" * 300  # users.workos_id is varchar(255)
EVIL_MESSAGE_ID: Final = "99999999-9999-9999-9999-999999999999"
HUGE_TEXT_BYTES: Final = 4 * 2**20

# (line bytes, the reason the reader gives) appended after fixture A's two message lines, so
# they are lines 3.. of messages/documents.jsonl.
BAD_LINES: Final[tuple[tuple[bytes, str], ...]] = (
    (b'{"messageId": "\xff\xfe", "text": "latin-1 \xe9"}', "invalid UTF-8"),
    (b'{"messageId": broken', "invalid JSON: "),
    (b"[1, 2, 3]", "not a JSON object (array)"),
    (b'"just a string"', "not a JSON object (string)"),
    (b"42", "not a JSON object (number)"),
    (b"null", "not a JSON object (null)"),
    (b"true", "not a JSON object (boolean)"),
    (b'{"a": 1} {"b": 2}', "invalid JSON: "),
)


# --------------------------------------------------------------------------- writing


def fixture_tables() -> dict[str, list[dict[str, Any]]]:
    """A fresh deep copy of fixture A's documents, table by table."""
    return copy.deepcopy(load_reference_fixture("fixture-a"))


def jsonl(rows: Iterable[dict[str, Any]], *, newline: bytes = b"\n") -> bytes:
    """Rows as JSON lines, each followed by `newline`."""
    return b"".join(orjson.dumps(row) + newline for row in rows)


def _info(name: str, compression: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ENTRY_TIME)
    info.compress_type = compression
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def write_zip(
    path: Path,
    entries: Sequence[tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]],
    *,
    compression: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """A ZIP with these entries in this order (names as given: nothing is sanitised)."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                archive.writestr(entry, b"")
            elif isinstance(entry[0], zipfile.ZipInfo):
                archive.writestr(entry[0], entry[1])
            else:
                name, data = entry
                archive.writestr(_info(str(name), compression), data)
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        file = root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    return root


def _entries(
    tables: dict[str, list[dict[str, Any]]], *, prefix: str = "", newline: bytes = b"\n"
) -> list[tuple[str, bytes]]:
    return [
        (f"{prefix}{table}/documents.jsonl", jsonl(rows, newline=newline))
        for table, rows in tables.items()
    ]


def good_export(directory: Path, name: str = "good.zip") -> Path:
    """Fixture A, untouched: the 'prior good import' of the invalid-source tests."""
    return write_zip(directory / name, _entries(fixture_tables()))


# --------------------------------------------------------------------------- invalid sources


def empty_file(directory: Path) -> Path:
    path = directory / "empty.zip"
    path.write_bytes(b"")
    return path


def truncated_zip(directory: Path) -> Path:
    """The first half of a good export: the central directory is gone."""
    data = good_export(directory, "whole.zip").read_bytes()
    path = directory / "truncated.zip"
    path.write_bytes(data[: len(data) // 2])
    return path


def not_a_zip(directory: Path) -> Path:
    """A plausible mistake: one table's documents.jsonl given as the export."""
    path = directory / "export.zip"
    path.write_bytes(jsonl(fixture_tables()["users"]))
    return path


def no_chat_tables(directory: Path) -> Path:
    """Well-formed, but only tables the importer does not read (and blueprints)."""
    return write_zip(
        directory / "no-chat.zip",
        [
            ("README.md", b"export of deployment khala-prod\n"),
            ("messageParts/documents.jsonl", b'{"_id": "messageParts:1"}\n'),
            ("lightningInvoices/documents.jsonl", b'{"_id": "lightningInvoices:1"}\n'),
            ("blueprints/documents.jsonl", jsonl(fixture_tables()["blueprints"])),
        ],
    )


def only_folder_entries(directory: Path) -> Path:
    """Every chat 'table' is a folder entry: a trailing slash, a Unix directory mode or the
    MS-DOS directory bit. None may be read as a table."""
    slash = zipfile.ZipInfo("users/documents.jsonl/", date_time=ENTRY_TIME)
    slash.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
    unix_dir = zipfile.ZipInfo("threads/documents.jsonl", date_time=ENTRY_TIME)
    unix_dir.external_attr = (stat.S_IFDIR | 0o755) << 16
    dos_dir = zipfile.ZipInfo("messages/documents.jsonl", date_time=ENTRY_TIME)
    dos_dir.external_attr = 0x10
    return write_zip(
        directory / "folders.zip",
        [
            slash,
            (unix_dir, b'{"threadId": "hidden-in-a-folder-entry"}\n'),
            (dos_dir, b'{"messageId": "hidden-in-a-folder-entry"}\n'),
        ],
    )


def folder_table_is_a_folder(directory: Path) -> Path:
    """A folder export whose only chat table file is a directory."""
    root = directory / "export"
    (root / "users" / "documents.jsonl").mkdir(parents=True)
    write_folder(root, {"messageParts/documents.jsonl": b"{}\n"})
    return root


UNSAFE_NAMES: Final = (
    "../users/documents.jsonl",
    "a/../../threads/documents.jsonl",
    "/etc/runs/documents.jsonl",
    "..\\messages/documents.jsonl",
    "C:/Windows/receipts/documents.jsonl",
    "\\\\server\\share/users/documents.jsonl",
)


def _evil_tables() -> dict[str, bytes]:
    evil = {
        "users": {"userId": "user_evil", "email": "evil@example.com", "createdAtMs": 1},
        "threads": {"threadId": "eeeeeeee-eeee-eeee-eeee-eeeeeeeeeeee", "ownerId": "user_evil"},
        "runs": {"threadId": "eeeeeeee-eeee-eeee-eeee-eeeeeeeeeeee", "runId": RUN},
        "messages": {
            "threadId": THREAD,
            "messageId": EVIL_MESSAGE_ID,
            "role": "user",
            "text": "written through a zip-slip name",
        },
        "receipts": {"_id": "receipts:evil", "threadId": THREAD, "runId": RUN, "kind": "x"},
    }
    return {table: orjson.dumps(doc) + b"\n" for table, doc in evil.items()}


def _unsafe_entries() -> list[tuple[str, bytes]]:
    evil = _evil_tables()
    out = []
    for name in UNSAFE_NAMES:
        table = name.replace("\\", "/").split("/")[-2]
        out.append((name, evil[table]))
    return out


def only_unsafe_names(directory: Path) -> Path:
    """Every chat table is behind an absolute name or a `..` segment (zip-slip)."""
    return write_zip(directory / "zip-slip.zip", _unsafe_entries())


def unsafe_names_beside_good_tables(directory: Path) -> Path:
    """Fixture A, plus zip-slip entries for every table placed after the good ones (so they
    would win if they were followed)."""
    return write_zip(
        directory / "zip-slip-mixed.zip", [*_entries(fixture_tables()), *_unsafe_entries()]
    )


def decompression_bomb(directory: Path) -> Path:
    """users/documents.jsonl inflates 72 MiB of blank lines from about 72 KiB (~1000x): large
    enough for the ratio guard (a smaller entry may compress as well as it likes)."""
    user = jsonl(fixture_tables()["users"])
    blank = b" " * (2**20 - 1) + b"\n"
    return write_zip(
        directory / "bomb.zip",
        [
            ("users/documents.jsonl", user + blank * 72),
            ("threads/documents.jsonl", jsonl(fixture_tables()["threads"])),
        ],
    )


def corrupt_entry(directory: Path) -> Path:
    """A valid central directory, but damaged compressed bytes inside the messages entry:
    only reading the entry finds it (CRC or inflate error)."""
    good = good_export(directory, "to-damage.zip")
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo("messages/documents.jsonl")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 5, start + info.compress_size - 2):
        data[i] ^= 0x5A
    path = directory / "corrupt-entry.zip"
    path.write_bytes(bytes(data))
    good.unlink()
    return path


INVALID_SOURCES: Final[dict[str, Builder]] = {
    "empty-file": empty_file,
    "truncated-zip": truncated_zip,
    "not-a-zip": not_a_zip,
    "no-chat-tables": no_chat_tables,
    "only-folder-entries": only_folder_entries,
    "folder-table-is-a-folder": folder_table_is_a_folder,
    "only-unsafe-names": only_unsafe_names,
    "decompression-bomb": decompression_bomb,
    "corrupt-entry": corrupt_entry,
}


# --------------------------------------------------------------------------- bad lines


def bad_lines(directory: Path) -> Path:
    """Fixture A with BAD_LINES appended to messages (lines 3 to 10)."""
    tables = fixture_tables()
    entries = _entries(tables)
    index = [name for name, _ in entries].index("messages/documents.jsonl")
    messages = jsonl(tables["messages"]) + b"".join(line + b"\n" for line, _ in BAD_LINES)
    entries[index] = ("messages/documents.jsonl", messages)
    return write_zip(directory / "bad-lines.zip", entries)


def _huge_text() -> str:
    # Hex of an extendable-output hash: deterministic, and deflate cannot shrink it past 2:1.
    return hashlib.shake_256(b"khala-stream huge line").hexdigest(HUGE_TEXT_BYTES // 2)


def huge_lines(directory: Path) -> Path:
    """A valid 4 MiB message (imported whole) and a 3 MiB line that is not JSON (set aside
    with all of its bytes)."""
    tables = fixture_tables()
    tables["messages"][1]["text"] = _huge_text()
    entries = _entries(tables)
    index = [name for name, _ in entries].index("messages/documents.jsonl")
    broken = b'{"messageId": "' + _huge_text()[: 3 * 2**20].encode() + b"\n"
    entries[index] = ("messages/documents.jsonl", entries[index][1] + broken)
    return write_zip(directory / "huge-lines.zip", entries)


def huge_text() -> str:
    """The text of the huge message of `huge_lines`."""
    return _huge_text()


def wrong_types(directory: Path) -> Path:
    """Fields of the wrong JSON type: numbers for string ids, string timestamps, nested
    nulls, objects where strings belong."""
    tables = fixture_tables()
    tables["users"] = [
        # A numeric string timestamp is usable (SPEC §8.3).
        {**tables["users"][0], "createdAtMs": "1735700000000"},
        # A number for the key: the document cannot be identified (missing_key).
        {"_id": "users:2", "userId": 12345, "email": "number-id@example.com"},
        # Nulls and objects where strings and numbers belong.
        {"_id": "users:3", "userId": "usernulls", "email": None, "createdAtMs": None},
        {"_id": "users:4", "userId": "userobject", "email": {"value": "x@example.com"}},
    ]
    owned = tables["threads"][0]
    owned["createdAtMs"] = "1735700001000"
    owned["updatedAtMs"] = "1735700002999.9"  # fractions truncated, then floored to seconds
    tables["threads"] += [
        {"_id": "threads:num", "threadId": 42, "ownerId": USER},
        {
            "_id": "threads:objowner",
            "threadId": "bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb",
            "ownerId": {"id": USER},
        },
    ]
    tables["messages"][0]["updatedAtMs"] = None
    tables["messages"][1]["text"] = 42  # not a string: empty content (SPEC §8.4)
    tables["messages"].append(
        {
            "_id": "messages:3",
            "threadId": THREAD,
            "messageId": "55555555-5555-5555-5555-555555555555",
            "role": None,  # not a role: skipped
            "text": "no role",
        }
    )
    tables["receipts"][0]["json"] = {"nested": {"deeper": None, "list": [None, {}]}}
    tables["receipts"][0]["createdAtMs"] = "not a number"
    tables["receipts"][0]["_creationTime"] = 1735700021000.5
    tables["blueprints"][0]["blueprint"]["docs"]["user"] = None
    tables["blueprints"][0]["blueprint"]["docs"]["character"] = {"coreTruths": [None, 7, "ok"]}
    return write_zip(directory / "wrong-types.zip", _entries(tables))


def long_ids(directory: Path) -> Path:
    """Ids longer than their Laravel columns: PostgreSQL refuses those rows (SQLite does not
    enforce varchar lengths)."""
    tables = fixture_tables()
    tables["users"].append(
        {"_id": "users:long", "userId": LONG_USER_ID, "email": "long-id@example.com"}
    )
    tables["threads"].append(
        {"_id": "threads:long", "threadId": LONG_ID, "ownerId": USER, "createdAtMs": 1735700003000}
    )
    tables["messages"].append(
        {
            "_id": "messages:long",
            "threadId": THREAD,
            "messageId": LONG_ID,
            "role": "assistant",
            "text": "an id of 40 characters",
            "createdAtMs": 1735700021000,
        }
    )
    return write_zip(directory / "long-ids.zip", _entries(tables))


# --------------------------------------------------------------------------- tolerated


def crlf(directory: Path) -> Path:
    """Fixture A written with CRLF line endings (an export edited on Windows)."""
    return write_zip(directory / "crlf.zip", _entries(fixture_tables(), newline=b"\r\n"))


def bom(directory: Path) -> Path:
    """Every table file starts with a UTF-8 byte order mark."""
    entries = [(name, b"\xef\xbb\xbf" + data) for name, data in _entries(fixture_tables())]
    return write_zip(directory / "bom.zip", entries)


def empty_lines(directory: Path) -> Path:
    """100,000 empty lines before the users, and between and after the messages."""
    tables = fixture_tables()
    entries = dict(_entries(tables))
    entries["users/documents.jsonl"] = b"\n" * 100_000 + entries["users/documents.jsonl"]
    first, second = (orjson.dumps(m) for m in tables["messages"])
    blank = b"\n" * 100_000
    entries["messages/documents.jsonl"] = first + blank + second + b"\r\n" * 100_000 + blank
    return write_zip(directory / "empty-lines.zip", list(entries.items()))


def empty_chat_tables(directory: Path) -> Path:
    """Every chat table present and empty (0 bytes): a valid export with nothing in it."""
    return write_zip(
        directory / "empty-tables.zip",
        [(f"{t}/documents.jsonl", b"") for t in ("users", "threads", "runs", "messages")],
    )


def duplicates(directory: Path) -> Path:
    """Documents whose key appears twice: the last line wins entirely (SPEC §8.2)."""
    tables = fixture_tables()
    user = tables["users"][0]
    tables["users"] = [
        {**user, "email": "first-version@example.com", "createdAtMs": 1735600000000},
        {"_id": "users:1b", "userId": USER, "email": "second-version@example.com"},
    ]
    first, second = tables["messages"]
    tables["messages"] = [
        first,
        second,
        # A later version of the first message: a new text, and no `updatedAtMs` any more.
        {k: v for k, v in first.items() if k != "updatedAtMs"} | {"text": "Second version."},
    ]
    thread = tables["threads"][0]
    tables["threads"].insert(0, {**thread, "createdAtMs": 1, "updatedAtMs": 2})
    return write_zip(directory / "duplicates.zip", _entries(tables))


def table_twice(directory: Path) -> Path:
    """users present twice under different prefixes: the later ZIP entry wins, even though
    its name sorts first."""
    tables = fixture_tables()
    user = tables["users"][0]
    earlier = jsonl([{**user, "email": "from-z-prefix@example.com"}])
    later = jsonl([{**user, "email": "from-a-prefix@example.com"}])
    entries = [("z-old/users/documents.jsonl", earlier), *_entries(tables)]
    entries = [e for e in entries if e[0] != "users/documents.jsonl"]
    entries.append(("a-new/users/documents.jsonl", later))
    return write_zip(directory / "table-twice.zip", entries)


def zip_bytes(entries: Sequence[tuple[str, bytes]]) -> bytes:
    """A ZIP in memory (for fuzzing seeds)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(_info(name, zipfile.ZIP_DEFLATED), data)
    return buffer.getvalue()
