"""Streaming reader of a Khala snapshot export: a ZIP or an unpacked folder.

One `<table>/documents.jsonl` per table, one JSON document per line (reference §1.1–1.2,
SPEC §8.1). Entries are decompressed in chunks and split on LF; no entry is ever held in
memory whole and nothing is ever extracted to disk. Bad lines come back as `RejectedLine`
(SPEC §3.2) instead of being dropped; bad sources raise `InvalidExportError` (SPEC §3.1).
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol

import orjson

from khala_stream.contract.tables import CHAT_TABLES, SOURCE_TABLES
from khala_stream.errors import InvalidExportError

__all__ = [
    "DEFAULT_MAX_ENTRY_BYTES",
    "DEFAULT_MAX_RATIO",
    "DEFAULT_MAX_TOTAL_BYTES",
    "HOLDS_NUL",
    "MAX_DEPTH",
    "MAX_LINE_BYTES",
    "RATIO_FROM_BYTES",
    "TOO_DEEP",
    "ExportSource",
    "RejectedLine",
    "SourceDocument",
    "open_export",
    "parse_document",
]

DEFAULT_MAX_ENTRY_BYTES: Final = 8 * 2**30
DEFAULT_MAX_TOTAL_BYTES: Final = 32 * 2**30
DEFAULT_MAX_RATIO: Final = 200.0

TABLE_FILE: Final = "documents.jsonl"
_CHUNK: Final = 1 << 20
MAX_LINE_BYTES: Final = 32 << 20
"""The longest line read as a document. A Convex document takes at most 1 MiB; a line's dead
letter (base64 and provenance) must still fit one broker message (64 MiB)."""
_OVERLONG_KEPT: Final = 1 << 20  # of a longer line, what its dead letter shows
RATIO_FROM_BYTES: Final = 2 * MAX_LINE_BYTES
"""A decompression bomb is a matter of inflated size: an entry is refused when it inflates past
`max_entry_bytes`, or all source tables together past `max_total_bytes`. The ratio is a guard
for large entries only: below 64 MiB an entry may compress as well as it likes (a few MiB of
repetitive text, a run of blank lines), since reading it costs well under a second."""
MAX_DEPTH: Final = 64
"""The deepest a document may nest (the line's object is level 1). The product hashes, publishes
and stores a document by re-encoding it (orjson refuses past 254 levels) and embeds some of its
values a few levels deeper in rows (a receipt's `json` in a run event's payload), so the limit
keeps well clear of that; real documents nest a handful of levels."""
TOO_DEEP: Final = f"nested deeper than {MAX_DEPTH} levels"
HOLDS_NUL: Final = "holds a NUL character (\\u0000), which PostgreSQL cannot store"
_BOM: Final = b"\xef\xbb\xbf"
_NO_CHAT_TABLES: Final = "holds none of the chat tables users, threads, runs, messages, receipts"
_DRIVE: Final = re.compile(r"^[A-Za-z]:")

# Everything zipfile and its decompressors raise on hostile or damaged archives.
_ZIP_ERRORS: Final[tuple[type[BaseException], ...]] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    EOFError,
    OSError,  # bz2 reports bad streams as OSError
    ValueError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
    IndexError,
    KeyError,
)


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceDocument:
    """One parsed line: a JSON object."""

    table: str
    entry: str
    line: int
    raw: bytes
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedLine:
    """One non-blank line that is not a JSON object, with the reason (SPEC §3.2)."""

    table: str
    entry: str
    line: int
    raw: bytes
    reason: str


def _unsafe_name(name: str) -> bool:
    """Absolute names and `..` segments are never followed (zip-slip)."""
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _is_dir_entry(info: zipfile.ZipInfo) -> bool:
    if info.is_dir():
        return True
    # MS-DOS directory bit, or a Unix mode saying "directory".
    return bool(info.external_attr & 0x10) or stat.S_ISDIR(info.external_attr >> 16)


def _zip_table_name(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if not name.endswith("/" + TABLE_FILE) or _is_dir_entry(info) or _unsafe_name(name):
        return None
    segments = name.strip("/").split("/")
    if len(segments) < 2 or not segments[-2]:
        return None
    return segments[-2]


def _zip_time_ms(info: zipfile.ZipInfo) -> int | None:
    try:
        return int(datetime(*info.date_time, tzinfo=UTC).timestamp() * 1000)
    except (ValueError, OverflowError):
        return None  # a DOS date with month 0 or day 0: no usable time


def _describe(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null"


@dataclass(frozen=True, slots=True)
class _Overlong:
    """A line longer than `max_line`: its first bytes, and its length."""

    head: bytes
    size: int


def _split_lines(
    stream: _Readable, chunk_size: int = _CHUNK, max_line: int = MAX_LINE_BYTES
) -> Iterator[bytes | _Overlong]:
    """Yield physical lines (LF removed), reading fixed-size chunks.

    A line longer than a chunk is collected as pieces and joined once, so a multi-MB line
    costs linear time. Past `max_line` bytes only its length is counted (memory stays bounded
    whatever the input): it comes out as an `_Overlong`.
    """
    pending: list[bytes] = []
    size = 0

    def take(piece: bytes) -> None:
        nonlocal size
        if size <= max_line:
            pending.append(piece)
        size += len(piece)

    def line() -> bytes | _Overlong:
        nonlocal pending, size
        whole = b"".join(pending)
        done = whole if size <= max_line else _Overlong(whole[:_OVERLONG_KEPT], size)
        pending, size = [], 0
        return done

    while chunk := stream.read(chunk_size):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if pending or end - start > max_line:
                take(chunk[start:end])
                yield line()
            else:
                yield chunk[start:end]
            start = end + 1
        if start < len(chunk):
            take(chunk[start:])
    if pending:
        yield line()


def _parse_lines(
    table: str, entry: str, stream: _Readable
) -> Iterator[SourceDocument | RejectedLine]:
    for number, line in enumerate(_split_lines(stream), start=1):
        if isinstance(line, _Overlong):
            too_long = (
                f"line too long: {line.size:,} bytes, more than the {MAX_LINE_BYTES >> 20} MiB"
                f" a document may take (its first {len(line.head):,} bytes are kept here)"
            )
            yield RejectedLine(
                table=table, entry=entry, line=number, raw=line.head, reason=too_long
            )
            continue
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():  # bytes.strip() strips ASCII whitespace only
            continue
        document, reason = parse_document(line)
        if document is not None:
            yield SourceDocument(table=table, entry=entry, line=number, raw=line, doc=document)
        else:
            yield RejectedLine(table=table, entry=entry, line=number, raw=line, reason=reason)


def parse_document(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """The one parse rule for a line (SPEC §8.1): (the document, "") or (None, why not).

    A document is a JSON object nested at most `MAX_DEPTH` levels, with no NUL character in
    any of its strings: anything the product could not hash, publish and store is refused
    here, with its reason, never later.
    """
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid UTF-8"
        if str(exc).startswith("depth limit exceeded"):  # orjson's own limit, 1,024 levels
            return None, TOO_DEEP
        return None, f"invalid JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"not a JSON object ({_describe(value)})"
    # Only a line with enough brackets can nest that deep: the count is C-speed, the walk not.
    if line.count(b"{") + line.count(b"[") > MAX_DEPTH and _deeper_than(value, MAX_DEPTH):
        return None, TOO_DEEP
    # JSON can only spell U+0000 as this escape (its text may be an escaped backslash too).
    if b"\\u0000" in line and _holds_nul(value):
        return None, HOLDS_NUL
    return value, ""


def _holds_nul(value: object) -> bool:
    """Whether any string of a parsed value, keys included, holds U+0000 (no recursion)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\0" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _deeper_than(value: object, limit: int) -> bool:
    """Whether a parsed value nests more than `limit` objects and arrays (no recursion)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            pending.extend((child, depth + 1) for child in item.values() if _nests(child))
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item if _nests(child))
    return False


def _nests(value: object) -> bool:
    return isinstance(value, dict | list)


class _CountingReader:
    """Counts inflated bytes and refuses an entry that inflates past the limits."""

    def __init__(
        self,
        inner: _Readable,
        *,
        path: Path,
        entry: str,
        compressed: int,
        max_entry_bytes: int,
        max_ratio: float,
    ) -> None:
        self._inner = inner
        self._path = path
        self._entry = entry
        self._compressed = max(compressed, 1)
        self._max_entry_bytes = max_entry_bytes
        self._max_ratio = max_ratio
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.count += len(data)
        if self.count > self._max_entry_bytes:
            raise InvalidExportError(
                self._path,
                f"entry {self._entry} inflates beyond {self._max_entry_bytes} bytes; refused",
            )
        if self.count > RATIO_FROM_BYTES and self.count / self._compressed > self._max_ratio:
            raise InvalidExportError(
                self._path,
                f"entry {self._entry} inflates more than {self._max_ratio:g}x; refused",
            )
        return data


class ExportSource:
    """An opened export. Use as a context manager; it closes the ZIP."""

    path: Path
    kind: Literal["zip", "folder"]
    size_bytes: int
    tables: dict[str, str]
    snapshot_ms: int | None

    def __init__(
        self,
        *,
        path: Path,
        kind: Literal["zip", "folder"],
        size_bytes: int,
        tables: dict[str, str],
        snapshot_ms: int | None,
        zip_file: zipfile.ZipFile | None,
        zip_infos: dict[str, zipfile.ZipInfo],
        max_entry_bytes: int,
        max_ratio: float,
        sha256: str | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.size_bytes = size_bytes
        self.tables = tables
        self.snapshot_ms = snapshot_ms
        self._zip = zip_file
        self._zip_infos = zip_infos
        self._max_entry_bytes = max_entry_bytes
        self._max_ratio = max_ratio
        self._sha256 = sha256
        self._entry_digests: dict[str, str] = {}

    def __enter__(self) -> ExportSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __repr__(self) -> str:
        return f"ExportSource(path={str(self.path)!r}, kind={self.kind!r}, tables={self.tables!r})"

    def has_table(self, table: str) -> bool:
        return table in self.tables

    def sha256(self) -> str:
        """The export's fingerprint, streamed once and cached.

        ZIP: the file's bytes. Folder: each table file's relative path, size and bytes, in
        sorted path order (the folder's other files do not take part).
        """
        if self._sha256 is None:
            digest = hashlib.sha256()
            try:
                if self.kind == "zip":
                    with self.path.open("rb") as handle:
                        while chunk := handle.read(_CHUNK):
                            digest.update(chunk)
                else:
                    for entry in sorted(self.tables.values()):
                        file = self.path / entry
                        digest.update(entry.encode("utf-8") + b"\0")
                        digest.update(file.stat().st_size.to_bytes(8, "big"))
                        with file.open("rb") as handle:
                            while chunk := handle.read(_CHUNK):
                                digest.update(chunk)
            except OSError as exc:
                raise InvalidExportError(self.path, f"cannot read: {exc}") from exc
            self._sha256 = digest.hexdigest()
        return self._sha256

    def verify(self, tables: Iterable[str]) -> None:
        """Read these tables' entries once (ZIP: CRC and size limits checked), parsing nothing.

        Damage inside a ZIP entry only shows while it is read; the importer calls this before
        its first write, so a corrupt export is refused with exit 2 and nothing written. The
        entries' digests (`entry_sha256`) are taken on the way.
        """
        for table in tables:
            self.entry_sha256(table)

    def entry_sha256(self, table: str) -> str | None:
        """sha256 of a table's entry as stored (inflated) bytes, or None when it has none.

        Two exports whose entries of a table have one digest list the same lines in the same
        order: the publisher re-imports such a table without reading it (SPEC §5).
        """
        if table not in self.tables:
            return None
        if table not in self._entry_digests:
            digest = hashlib.sha256()
            with self._open_entry(table) as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
            self._entry_digests[table] = digest.hexdigest()
        return self._entry_digests[table]

    def iter_table(self, table: str) -> Iterator[SourceDocument | RejectedLine]:
        """Documents and rejected lines of one table, in file order; empty when missing."""
        entry = self.tables.get(table)
        if entry is None:
            return
        with self._open_entry(table) as stream:
            yield from _parse_lines(table, entry, stream)

    @contextlib.contextmanager
    def _open_entry(self, table: str) -> Iterator[_Readable]:
        """A table's entry as a stream of bytes: a folder's file (no link followed), or a ZIP
        entry inflated under the size limits. Read errors are InvalidExportError."""
        entry = self.tables[table]
        if self.kind == "folder":
            try:
                # No link is followed, even one made after the export was opened.
                fd = os.open(self.path / entry, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                with os.fdopen(fd, "rb") as handle:
                    yield handle
            except OSError as exc:
                raise InvalidExportError(self.path, f"cannot read {entry}: {exc}") from exc
            return
        if self._zip is None:
            raise ValueError("the export is closed")
        info = self._zip_infos[table]
        _check_declared(self.path, info, self._max_entry_bytes, self._max_ratio)
        try:
            with self._zip.open(info) as raw:
                yield _CountingReader(
                    raw,
                    path=self.path,
                    entry=entry,
                    compressed=info.compress_size,
                    max_entry_bytes=self._max_entry_bytes,
                    max_ratio=self._max_ratio,
                )
        except InvalidExportError:
            raise
        except _ZIP_ERRORS as exc:
            raise InvalidExportError(self.path, f"corrupt ZIP: entry {entry}: {exc}") from exc


def _check_declared(path: Path, info: zipfile.ZipInfo, max_entry: int, max_ratio: float) -> None:
    size, packed = info.file_size, info.compress_size
    if size > max_entry:
        raise InvalidExportError(
            path, f"entry {info.filename} declares {size} bytes (limit {max_entry}); refused"
        )
    if size > RATIO_FROM_BYTES and size / max(packed, 1) > max_ratio:
        raise InvalidExportError(
            path,
            f"entry {info.filename} declares a {size / max(packed, 1):.0f}x compression ratio "
            f"(limit {max_ratio:g}x); refused as a decompression bomb",
        )


def _open_zip(
    path: Path, max_entry_bytes: int, max_ratio: float, max_total_bytes: int
) -> ExportSource:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise InvalidExportError(path, f"cannot read: {exc}") from exc
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        if not magic.startswith(b"PK"):
            raise InvalidExportError(path, "not a ZIP archive") from exc
        detail = str(exc)
        if detail == "File is not a zip file":
            detail = "end of central directory not found (truncated?)"
        raise InvalidExportError(path, f"corrupt ZIP: {detail}") from exc
    try:
        infos: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            table = _zip_table_name(info)
            if table is not None:
                infos.pop(table, None)  # later entry in ZIP order wins, and keeps its place
                infos[table] = info
        if not CHAT_TABLES.intersection(infos):
            raise InvalidExportError(path, _NO_CHAT_TABLES)
        total = sum(info.file_size for table, info in infos.items() if table in SOURCE_TABLES)
        if total > max_total_bytes:
            raise InvalidExportError(
                path,
                f"the source tables declare {total} bytes in all (limit {max_total_bytes});"
                " refused as a decompression bomb",
            )
        for table, info in infos.items():
            # Only what the importer reads can make the export unusable; an ignored
            # table's oversize entry is checked if and when someone reads it.
            if table in SOURCE_TABLES:
                _check_declared(path, info, max_entry_bytes, max_ratio)
                _probe_entry(archive, path, info)
        times = [ms for info in infos.values() if (ms := _zip_time_ms(info)) is not None]
        return ExportSource(
            path=path,
            kind="zip",
            size_bytes=path.stat().st_size,
            tables={table: info.filename for table, info in infos.items()},
            snapshot_ms=max(times, default=None),
            zip_file=archive,
            zip_infos=infos,
            max_entry_bytes=max_entry_bytes,
            max_ratio=max_ratio,
        )
    except BaseException:
        archive.close()
        raise


def _probe_entry(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo) -> None:
    """Open the entry's local header now, so a broken archive fails before any work starts."""
    try:
        with archive.open(info) as handle:
            handle.read(1)
    except _ZIP_ERRORS as exc:
        raise InvalidExportError(path, f"corrupt ZIP: entry {info.filename}: {exc}") from exc


def _open_folder(path: Path, max_entry_bytes: int, max_total_bytes: int) -> ExportSource:
    """An unpacked export: one `<table>/documents.jsonl` per table, under one folder.

    Refused: any symbolic link inside (an export unpacked from a ZIP holds none, and a link
    may lead anywhere: another user's files, a device, a table of another export), and a
    folder holding more than one export (table files under several parents), which would
    otherwise mix or silently pick one of them. The size limits of a ZIP's inflated entries
    hold for the table files too: a sparse file takes no disk and reads for hours.
    """
    found: dict[str, Path] = {}
    roots: set[tuple[str, ...]] = set()  # the folders holding source tables: one export's
    try:
        for root, dirs, files in os.walk(path, onerror=_raise):
            dirs.sort()  # deterministic walk and messages
            here = Path(root)
            for name in sorted(dirs + files):
                if (here / name).is_symlink():
                    link = (here / name).relative_to(path)
                    raise InvalidExportError(
                        path, f"{link} is a symbolic link; a folder export must hold its own files"
                    )
            if TABLE_FILE not in files or here == path or not (here / TABLE_FILE).is_file():
                continue
            relative = (here / TABLE_FILE).relative_to(path)
            table = relative.parts[-2]
            if table in SOURCE_TABLES:
                roots.add(relative.parts[:-2])
            found.setdefault(table, here / TABLE_FILE)  # an ignored table: the first one
    except OSError as exc:
        raise InvalidExportError(path, f"cannot read: {exc}") from exc
    if len(roots) > 1:
        names = ", ".join("/".join(parts) or "." for parts in sorted(roots))
        raise InvalidExportError(
            path, f"holds more than one export ({names}); give the folder of one of them"
        )
    files_by_table = {table: found[table] for table in sorted(found)}
    tables = {t: "/".join(f.relative_to(path).parts) for t, f in files_by_table.items()}
    if not CHAT_TABLES.intersection(tables):
        raise InvalidExportError(path, _NO_CHAT_TABLES)
    try:
        stats = {table: file.stat() for table, file in files_by_table.items()}
    except OSError as exc:
        raise InvalidExportError(path, f"cannot read: {exc}") from exc
    sizes = {tables[t]: s.st_size for t, s in stats.items() if t in SOURCE_TABLES}
    for entry, size in sizes.items():
        if size > max_entry_bytes:
            raise InvalidExportError(
                path, f"{entry} holds {size} bytes (limit {max_entry_bytes}); refused"
            )
    if sum(sizes.values()) > max_total_bytes:
        raise InvalidExportError(
            path,
            f"the source tables hold {sum(sizes.values())} bytes in all"
            f" (limit {max_total_bytes}); refused",
        )
    return ExportSource(
        path=path,
        kind="folder",
        size_bytes=sum(s.st_size for s in stats.values()),
        tables=tables,
        snapshot_ms=max((s.st_mtime_ns // 1_000_000 for s in stats.values()), default=None),
        zip_file=None,
        zip_infos={},
        max_entry_bytes=max_entry_bytes,
        max_ratio=DEFAULT_MAX_RATIO,
    )


def folder_in_writing(
    path: Path, tables: Sequence[str], *, snapshot_ms: int, sha256: str
) -> ExportSource:
    """A folder export of our own making whose table files are still being written (`follow`
    walking a snapshot): its tables, time and fingerprint are known before its files, and a
    table is read only once its writer finished it (`producers.publisher.InWriting`)."""
    return ExportSource(
        path=path,
        kind="folder",
        size_bytes=0,
        tables={table: f"{table}/{TABLE_FILE}" for table in tables},
        snapshot_ms=snapshot_ms,
        zip_file=None,
        zip_infos={},
        max_entry_bytes=1 << 62,
        max_ratio=DEFAULT_MAX_RATIO,
        sha256=sha256,
    )


def _raise(exc: OSError) -> None:
    raise exc


def open_export(
    path: Path | str,
    *,
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> ExportSource:
    """Open a ZIP or folder export; raise `InvalidExportError` when it cannot be imported.

    A folder's source table files are refused past `max_entry_bytes` each and past
    `max_total_bytes` together.

    A ZIP's entries are refused as a decompression bomb past `max_entry_bytes` each, past
    `max_total_bytes` for the source tables together, and past `max_ratio` once an entry is
    larger than `RATIO_FROM_BYTES` (zipfile never inflates an entry beyond its declared size,
    so the declared sizes bound what reading can cost; the reading count re-checks them).
    """
    source = Path(path)
    try:
        mode = source.stat().st_mode
    except FileNotFoundError as exc:
        raise InvalidExportError(source, "does not exist") from exc
    except OSError as exc:
        raise InvalidExportError(source, f"cannot read: {exc}") from exc
    if stat.S_ISDIR(mode):
        return _open_folder(source, max_entry_bytes, max_total_bytes)
    if stat.S_ISREG(mode):
        return _open_zip(source, max_entry_bytes, max_ratio, max_total_bytes)
    raise InvalidExportError(source, "neither a file nor a folder")
