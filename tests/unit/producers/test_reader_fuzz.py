"""Hostile input: whatever the bytes, the reader raises `InvalidExportError` or nothing,
and every non-blank line ends up as a document or a rejection."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khala_stream.errors import InvalidExportError
from producers.export_reader import (
    HOLDS_NUL,
    TOO_DEEP,
    RejectedLine,
    SourceDocument,
    open_export,
)

# FUZZ_EXAMPLES=20000 for a long run.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def small_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            "users/documents.jsonl",
            b'{"userId":"u1"}\n[1]\n{"userId":"u2"}\n',
            compress_type=zipfile.ZIP_DEFLATED,
        )
        archive.writestr(
            "x/threads/documents.jsonl",
            b'{"threadId":"t"}\n' * 20,
            compress_type=zipfile.ZIP_BZIP2,
        )
        archive.writestr("runs/documents.jsonl", b'{"runId":"r"}\n\n{"runId":"s"}\n')
        archive.writestr(
            "receipts/documents.jsonl", b'{"_id":"r"}\n' * 9, compress_type=zipfile.ZIP_LZMA
        )
    return buffer.getvalue()


SEED_ZIP = small_zip()


def drain(path: Path) -> int:
    """Open and read every table; return how many items came out."""
    try:
        with open_export(path) as source:
            count = 0
            for table in list(source.tables):
                for item in source.iter_table(table):
                    assert isinstance(item, SourceDocument | RejectedLine)
                    count += 1
            source.sha256()
            return count
    except InvalidExportError as exc:
        assert exc.reason
        return -1


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_as_a_zip(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.zip"
        path.write_bytes(data)
        drain(path)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(SEED_ZIP) - 1), st.integers(0, 255)), max_size=12),
    st.one_of(st.none(), st.integers(0, len(SEED_ZIP))),
)
def test_damaged_zip(flips: list[tuple[int, int]], keep: int | None) -> None:
    data = bytearray(SEED_ZIP)
    for offset, value in flips:
        data[offset] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.zip"
        path.write_bytes(bytes(data[:keep]))
        drain(path)


def expected_lines(content: bytes) -> list[tuple[int, bytes]]:
    """The line rules of SPEC §8.1, written the obvious way."""
    out = []
    for number, line in enumerate(content.split(b"\n"), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            out.append((number, line))
    return out


json_lines = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"", b"\r", b" ", b"{}", b"[]", b"null", b'{"a":"\xe2\x80\xa8"}']),
        st.dictionaries(st.text(max_size=5), st.text(max_size=10), max_size=3).map(orjson.dumps),
    ),
    max_size=30,
).map(b"\n".join)


@FUZZ
@given(st.one_of(st.binary(max_size=4096), json_lines), st.booleans())
def test_arbitrary_documents_jsonl(content: bytes, as_zip: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if as_zip:
            path = Path(tmp) / "export.zip"
            with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr("users/documents.jsonl", content)
        else:
            path = Path(tmp) / "export"
            (path / "users").mkdir(parents=True)
            (path / "users" / "documents.jsonl").write_bytes(content)
        with open_export(path) as source:
            items = list(source.iter_table("users"))
    assert [(item.line, item.raw) for item in items] == expected_lines(content)
    for item in items:
        if isinstance(item, SourceDocument):
            assert isinstance(item.doc, dict) and orjson.loads(item.raw) == item.doc
        else:
            assert isinstance(item, RejectedLine)
            assert item.entry == "users/documents.jsonl"
            assert item.reason in ("invalid UTF-8", TOO_DEEP, HOLDS_NUL) or item.reason.startswith(
                ("invalid JSON: ", "not a JSON object (")
            )
