"""The only place that turns contract values into bytes and back (orjson, compact)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import orjson

from khala_stream.contract.changes import RowBatch, RowChange, RowUpsert, SourceRef
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from khala_stream.contract.tables import DestinationTable
from khala_stream.errors import UnknownRecordVersion

_SORTED = orjson.OPT_SORT_KEYS
K = TypeVar("K")


def dumps(value: Any) -> bytes:
    """Compact JSON; unicode and slashes unescaped, `{}` stays `{}` (SPEC §3.12)."""
    return orjson.dumps(value)


def dumps_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def canonical(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace: the basis of every content hash."""
    return orjson.dumps(value, option=_SORTED)


def content_hash(value: Any) -> str:
    """sha256 of the canonical JSON (SPEC §8.7): a re-serialised document is unchanged."""
    return hashlib.sha256(canonical(value)).hexdigest()


def _change_dict(change: RowChange) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "v": change.schema_version,
        "run": change.run_id,
        "table": change.table,
        "op": change.op,
        "key": change.key,
        "values": change.values,
        "hash": change.row_hash,
    }
    if change.source is not None:
        payload["src"] = [change.source.table, change.source.line, change.source.doc_id]
    return payload


class CodecError(ValueError):
    """Bytes that are not what the contract says a message holds; the message says why."""


_RUN_IDS: Final = range(1, 2**31)  # the run tables' ids are 32-bit integers


def _run_id(value: Any) -> int:
    if type(value) is not int or value not in _RUN_IDS:
        raise CodecError(f"run {value!r} is not a run id")
    return value


def _is_source(src: Any) -> bool:
    return (
        isinstance(src, list)
        and len(src) == 3
        and isinstance(src[0], str)
        and type(src[1]) is int
        and (src[2] is None or isinstance(src[2], str))
    )


def _source_ref(src: Any) -> SourceRef | None:
    if src is None:
        return None
    if not _is_source(src):
        raise CodecError("a change's source is not [table, line, _id]")
    return SourceRef(table=src[0], line=src[1], doc_id=src[2])


def _change_from(raw: Any) -> RowChange:
    """A decoded change, its types checked (which tables, operations and columns a sink may
    apply is its own rule, not the codec's)."""
    if not isinstance(raw, dict):
        raise CodecError("a change is not a JSON object")
    table, op, key = raw.get("table"), raw.get("op"), raw.get("key")
    values, digest, version = raw.get("values") or {}, raw.get("hash"), raw.get("v", 1)
    if not (isinstance(table, str) and isinstance(op, str) and isinstance(key, str)):
        raise CodecError("a change's table, op and key are not all strings")
    if not isinstance(values, dict):
        raise CodecError("a change's values are not a JSON object")
    if not (digest is None or isinstance(digest, str)) or type(version) is not int:
        raise CodecError("a change's hash or version has the wrong type")
    return RowChange(
        run_id=_run_id(raw.get("run")),
        table=table,  # type: ignore[arg-type]
        op=op,  # type: ignore[arg-type]
        key=key,
        values=values,
        row_hash=digest,
        source=_source_ref(raw.get("src")),
        schema_version=version,
    )


def _json(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"not JSON: {exc}") from None


def encode_change(change: RowChange) -> bytes:
    return orjson.dumps(_change_dict(change))


def decode_change(data: bytes) -> RowChange:
    """One encoded change; CodecError for anything else."""
    return _change_from(_json(data))


def decode_changes(data: bytes) -> list[RowChange]:
    """A message of the changes topic: a JSON array of encoded changes (README); CodecError
    for anything else."""
    changes = _json(data)
    if not isinstance(changes, list):
        raise CodecError("a changes message is not a JSON array")
    return [_change_from(raw) for raw in changes]


# The headers that mark a changes message as a `RowBatch` (any other message is a JSON array
# of encoded changes).
_BATCH_TABLE: Final = "khala-rows"
_BATCH_RUN: Final = "khala-run"
_BATCH_COLUMNS: Final = "khala-columns"
_BATCH_NEW: Final = "khala-new"
Headers = Sequence[tuple[str, bytes]]


def row_batches(
    run_id: int,
    table: DestinationTable,
    rows: Iterable[RowUpsert],
    max_bytes: int,
    *,
    new: bool = False,
) -> Iterator[RowBatch]:
    """`rows` as `RowBatch`es of at most `max_bytes` (or one row), one per column set. Takes
    over each row's values: the ledger members are added to them."""

    def encoded() -> Iterator[tuple[tuple[str, ...], bytes]]:
        for row in rows:
            columns = tuple(row.values)
            values, source = row.values, row.source
            values["_k"], values["_h"] = row.key, row.row_hash
            values["_s"] = (source.table, source.line, source.doc_id)
            yield columns, orjson.dumps(values)

    for columns, items in chunks(encoded(), max_bytes):
        yield _row_batch(run_id, table, columns, items, new)


def chunks(items: Iterable[tuple[K, bytes]], max_bytes: int) -> Iterator[tuple[K, list[bytes]]]:
    """Encoded items grouped by their key, in lists of at most `max_bytes` (counting a
    separator after each; or one item): a full list as soon as the next item would not fit,
    the rest at the end, in the order their keys first came."""
    open_: dict[K, tuple[list[bytes], int]] = {}
    for key, encoded in items:
        chunk, size = open_.get(key, ([], 0))
        if chunk and size + len(encoded) > max_bytes:
            yield key, chunk
            chunk, size = [], 0
        chunk.append(encoded)
        open_[key] = (chunk, size + len(encoded) + 1)
    for key, (chunk, _) in open_.items():
        yield key, chunk


def _row_batch(
    run_id: int, table: DestinationTable, columns: tuple[str, ...], items: list[bytes], new: bool
) -> RowBatch:
    # A JSON array of the encoded rows, joined without encoding them again.
    rows = b"[" + b",".join(items) + b"]"
    return RowBatch(run_id=run_id, table=table, columns=columns, rows=rows, new=new)


def row_batch_headers(batch: RowBatch) -> list[tuple[str, bytes]]:
    return [
        (_BATCH_TABLE, batch.table.encode()),
        (_BATCH_RUN, str(batch.run_id).encode()),
        (_BATCH_COLUMNS, ",".join(batch.columns).encode()),
        (_BATCH_NEW, b"1" if batch.new else b"0"),
    ]


def read_row_batch(headers: Headers, value: bytes) -> RowBatch | None:
    """The `RowBatch` a changes message holds, or None for an array of encoded changes;
    CodecError for headers that are not a batch's (its rows are checked by
    `row_batch_changes`)."""
    found = dict(headers)
    table = found.get(_BATCH_TABLE)
    if table is None:
        return None
    run, columns = found.get(_BATCH_RUN), found.get(_BATCH_COLUMNS)
    if run is None or columns is None:
        raise CodecError(f"a row batch without its {_BATCH_RUN} or {_BATCH_COLUMNS} header")
    try:
        names, run_id = table.decode(), _run_id(int(run))
        column_names = tuple(columns.decode().split(","))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"a row batch's headers cannot be read: {exc}") from None
    return RowBatch(
        run_id=run_id,
        table=names,  # type: ignore[arg-type]
        columns=column_names,
        rows=value,
        new=found.get(_BATCH_NEW) == b"1",
    )


_LEDGER_MEMBERS: Final = ("_k", "_h", "_s")


@dataclass(frozen=True, slots=True)
class CheckedRowBatch:
    """A `RowBatch` whose rows were decoded and checked once (`check_row_batch`), so that the
    sink writes them without decoding the message again."""

    batch: RowBatch
    rows: list[dict[str, Any]]
    """Each row's columns, and its ledger members `_k` (key), `_h` (hash), `_s` (source)."""


def check_row_batch(batch: RowBatch) -> CheckedRowBatch:
    """The batch's rows, decoded; CodecError for rows that are not objects with a ledger key,
    hash and source, or that hold a column the batch does not name."""
    rows = _json(batch.rows)
    if not isinstance(rows, list):
        raise CodecError("a row batch is not a JSON array")
    named = {*batch.columns, *_LEDGER_MEMBERS}
    for values in rows:
        if not isinstance(values, dict) or not named.issuperset(values):
            raise CodecError("a row batch's row is not an object of the batch's columns")
        if not (
            isinstance(values.get("_k"), str)
            and isinstance(values.get("_h"), str)
            and _is_source(values.get("_s"))
        ):
            raise CodecError("a row batch's row lacks its ledger key, hash or source")
    return CheckedRowBatch(batch, rows)


def row_batch_changes(batch: RowBatch | CheckedRowBatch) -> list[RowChange]:
    """A `RowBatch` as the upsert changes it stands for; CodecError as `check_row_batch`."""
    checked = batch if isinstance(batch, CheckedRowBatch) else check_row_batch(batch)
    run_id, table = checked.batch.run_id, checked.batch.table
    changes = []
    for row in checked.rows:
        values = {k: v for k, v in row.items() if k not in _LEDGER_MEMBERS}
        source_table, line, doc_id = row["_s"]
        changes.append(
            RowChange(
                run_id=run_id,
                table=table,
                op="upsert",
                key=row["_k"],
                values=values,
                row_hash=row["_h"],
                source=SourceRef(table=source_table, line=line, doc_id=doc_id),
            )
        )
    return changes


# -- run coordination records ----------------------------------------------------------------
# Version 0 is the shape stored before records had a version: a plain object without "v".
# Manifest version 2 added `entries` and `carried`: a reader that ignored `carried` would read
# a carried table's documents where there are none, so version 1 readers must refuse it.
# Version 3 added `patched`, for the same reason.

MANIFEST_VERSION: Final = 3
SUMMARY_VERSION: Final = 1


def _version(raw: Any, what: str, known: int) -> int:
    if not isinstance(raw, dict):
        raise UnknownRecordVersion(what, type(raw).__name__, known)
    version = raw.get("v", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= known:
        raise UnknownRecordVersion(what, version, known)
    return version


def _counts(raw: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in (raw or {}).items()}


def encode_manifest(manifest: PublishManifest) -> bytes:
    return orjson.dumps(
        {
            "v": MANIFEST_VERSION,
            "run_id": manifest.run_id,
            "export_sha256": manifest.export_sha256,
            "published": manifest.published,
            "source": manifest.source,
            "rejected": manifest.rejected,
            "missing_key": manifest.missing_key,
            "unchanged": manifest.unchanged,
            "rejected_lines": [list(r) for r in manifest.rejected_lines],
            "tables": manifest.tables,
            "ignored_tables": manifest.ignored_tables,
            "order": manifest.order,
            "entries": manifest.entries,
            "carried": manifest.carried,
            "patched": manifest.patched,
        }
    )


def decode_manifest(data: bytes | str, *, run_id: int, export_sha256: str) -> PublishManifest:
    """A stored manifest of run `run_id`; version 0 did not always name its run, so the
    caller's `run_id` and `export_sha256` stand in. UnknownRecordVersion for a newer one."""
    raw = orjson.loads(data)
    _version(raw, f"the publish manifest of run {run_id}", MANIFEST_VERSION)
    return PublishManifest(
        run_id=int(raw.get("run_id", run_id)),
        export_sha256=str(raw.get("export_sha256", export_sha256)),
        published=_counts(raw.get("published")),
        source=_counts(raw.get("source")),
        rejected=_counts(raw.get("rejected")),
        missing_key=_counts(raw.get("missing_key")),
        unchanged=_counts(raw.get("unchanged")),
        rejected_lines=[(str(f), int(n), str(r)) for f, n, r in raw.get("rejected_lines", [])],
        tables=[str(t) for t in raw.get("tables", [])],
        ignored_tables=[str(t) for t in raw.get("ignored_tables", [])],
        order={str(t): str(d) for t, d in (raw.get("order") or {}).items()},
        entries={str(t): str(d) for t, d in (raw.get("entries") or {}).items()},
        carried=_counts(raw.get("carried")),
        patched=_counts(raw.get("patched")),
    )


def encode_summary(summary: DerivationSummary) -> bytes:
    return orjson.dumps(
        {
            "v": SUMMARY_VERSION,
            "counters": summary.counters,
            "written": summary.written,
            "documents": summary.documents,
            "fingerprint": summary.fingerprint,
            "skipped": summary.skipped,
            "scoped_threads": summary.scoped_threads,
        }
    )


# Version 0 kept the counters at the top level, beside these.
_V0_SUMMARY_KEYS: Final = frozenset({"written", "documents", "options", "derivation_skipped"})


def decode_summary(data: bytes | str, *, run_id: int) -> DerivationSummary:
    """A stored derivation summary of run `run_id`; UnknownRecordVersion for a newer one."""
    raw = orjson.loads(data)
    if _version(raw, f"the derivation summary of run {run_id}", SUMMARY_VERSION) == 0:
        return DerivationSummary(
            counters=_counts({k: v for k, v in raw.items() if k not in _V0_SUMMARY_KEYS}),
            written=_counts(raw.get("written")),
            documents={t: _counts(c) for t, c in (raw.get("documents") or {}).items()},
            fingerprint=raw.get("options"),
            skipped=bool(raw.get("derivation_skipped", False)),
        )
    return DerivationSummary(
        counters=_counts(raw.get("counters")),
        written=_counts(raw.get("written")),
        documents={t: _counts(c) for t, c in (raw.get("documents") or {}).items()},
        fingerprint=raw.get("fingerprint"),
        skipped=bool(raw.get("skipped", False)),
        scoped_threads=_optional_int(raw.get("scoped_threads")),
    )


def _optional_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
