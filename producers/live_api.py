"""The streaming export API of a live Khala (Convex-style) deployment, in one place.

Endpoint paths, query parameters and the documented shape of each answer
(`../shared/reference/khala-streaming-export.md`): a point the documentation leaves open
(cursor types, what an expired snapshot answers) is decided here and nowhere else.

    GET /api/json_schemas?deltaSchema=true&format=json     -> {table: JSON schema}
    GET /api/list_snapshot?tableName&cursor&snapshot&format -> {values, cursor, hasMore, snapshot}
    GET /api/document_deltas?cursor&tableName&format        -> {values, cursor, hasMore}

Every value is an export line's document plus `_table` and `_ts` (nanoseconds); a deletion in
`document_deltas` carries only `_id`, `_table`, `_ts` and `_deleted: true`. Pure code: no I/O.
A parsed answer is taken over: its values become the page's documents, not copies of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from khala_stream.errors import SourceAnswerError

JSON_SCHEMAS: Final = "/api/json_schemas"
LIST_SNAPSHOT: Final = "/api/list_snapshot"
DOCUMENT_DELTAS: Final = "/api/document_deltas"
FORMAT: Final = "json"

Cursor = str | int
"""A position as the deployment gives it (Convex: a string page cursor in a snapshot walk, an
integer timestamp for deltas and snapshots). Opaque: only handed back."""


def schemas_params() -> dict[str, str]:
    return {"deltaSchema": "true", "format": FORMAT}


def snapshot_params(
    table: str | None, snapshot: Cursor | None, cursor: Cursor | None
) -> dict[str, str]:
    """`list_snapshot` parameters; no table and no snapshot asks for the current snapshot."""
    params = {"format": FORMAT}
    if table is not None:
        params["tableName"] = table
    if snapshot is not None:
        params["snapshot"] = str(snapshot)
    if cursor is not None:
        params["cursor"] = str(cursor)
    return params


def deltas_params(cursor: Cursor) -> dict[str, str]:
    """`document_deltas` from `cursor`, every table: a filtered stream may skip positions
    that writes to other tables moved (the reference page, "Consistency")."""
    return {"cursor": str(cursor), "format": FORMAT}


class LiveValue(NamedTuple):
    """One value of a page: a document version, or a deletion. A tuple: a walk makes one
    per document, and a frozen dataclass cost twice as much to make."""

    table: str
    doc_id: str
    ts: int
    """Commit time of this version, in nanoseconds."""
    deleted: bool
    creation_time: float
    """`_creationTime` (ms); 0 for a deletion or a document without a numeric one."""
    document: dict[str, Any]
    """The export line's document: the value without `_table`, `_ts`, `_deleted`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotPage:
    values: list[LiveValue]
    cursor: Cursor | None
    has_more: bool
    snapshot: Cursor


@dataclass(frozen=True, slots=True, kw_only=True)
class DeltaPage:
    values: list[LiveValue]
    cursor: Cursor
    has_more: bool


def parse_schemas(body: Any) -> list[str]:
    """The deployment's table names, from a `json_schemas` answer."""
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise SourceAnswerError(JSON_SCHEMAS, "something other than an object of tables")
    return sorted(body)


def parse_snapshot(body: Any) -> SnapshotPage:
    fields = _object(LIST_SNAPSHOT, body, ("values", "hasMore", "snapshot"))
    snapshot = _cursor(LIST_SNAPSHOT, fields, "snapshot", required=True)
    assert snapshot is not None
    return SnapshotPage(
        values=_values(LIST_SNAPSHOT, fields["values"], deltas=False),
        cursor=_cursor(LIST_SNAPSHOT, fields, "cursor", required=False),
        has_more=_bool(LIST_SNAPSHOT, fields, "hasMore"),
        snapshot=snapshot,
    )


def parse_deltas(body: Any) -> DeltaPage:
    fields = _object(DOCUMENT_DELTAS, body, ("values", "cursor", "hasMore"))
    cursor = _cursor(DOCUMENT_DELTAS, fields, "cursor", required=True)
    assert cursor is not None
    return DeltaPage(
        values=_values(DOCUMENT_DELTAS, fields["values"], deltas=True),
        cursor=cursor,
        has_more=_bool(DOCUMENT_DELTAS, fields, "hasMore"),
    )


def snapshot_expired(status: int, body: Any) -> bool:
    """Whether an error answer says the snapshot asked for is no longer served.

    The documentation does not say what that answer is; Convex refuses a read outside its
    retention window with a 4xx whose code or message names the snapshot or the window. Any
    such answer restarts the snapshot walk, which is cheap (the reference page)."""
    if status not in (400, 404, 409, 410, 422) or not isinstance(body, dict):
        return False
    text = f"{body.get('code', '')} {body.get('message', '')}".lower()
    return "snapshot" in text or "window" in text or "retention" in text


def cursor_expired(status: int, body: Any) -> bool:
    """Whether an error answer of `document_deltas` says the cursor is older than the changes
    the deployment keeps (left open by the documentation, as `snapshot_expired`): following
    goes on from a new snapshot."""
    if status not in (400, 404, 409, 410, 422) or not isinstance(body, dict):
        return False
    text = f"{body.get('code', '')} {body.get('message', '')}".lower()
    return "retention" in text or "window" in text or ("cursor" in text and "old" in text)


def _object(endpoint: str, body: Any, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SourceAnswerError(endpoint, "something other than a JSON object")
    missing = [name for name in required if name not in body]
    if missing:
        raise SourceAnswerError(endpoint, f"an object without {', '.join(missing)}")
    return body


def _bool(endpoint: str, body: dict[str, Any], name: str) -> bool:
    value = body[name]
    if not isinstance(value, bool):
        raise SourceAnswerError(endpoint, f"a {name} that is not true or false")
    return value


def _cursor(endpoint: str, body: dict[str, Any], name: str, *, required: bool) -> Cursor | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise SourceAnswerError(endpoint, f"a {name} that is not a string or an integer")
    return value


def _values(endpoint: str, raw: Any, *, deltas: bool) -> list[LiveValue]:
    if not isinstance(raw, list):
        raise SourceAnswerError(endpoint, "values that are not a list")
    return [_value(endpoint, i, item, deltas=deltas) for i, item in enumerate(raw)]


def _value(endpoint: str, index: int, item: Any, *, deltas: bool) -> LiveValue:
    if type(item) is not dict:  # orjson makes plain dicts; this check runs per document
        raise SourceAnswerError(endpoint, f"values[{index}] that is not an object")
    table, doc_id, ts = item.get("_table"), item.get("_id"), item.get("_ts")
    deleted = item.get("_deleted", False)
    if type(table) is not str or not table:
        raise SourceAnswerError(endpoint, f"values[{index}] without a string _table")
    if type(doc_id) is not str or not doc_id:
        raise SourceAnswerError(endpoint, f"values[{index}] without a string _id")
    if type(ts) is not int or ts < 0:
        raise SourceAnswerError(endpoint, f"values[{index}] without an integer _ts")
    if deleted is not False and (deleted is not True or not deltas):
        raise SourceAnswerError(endpoint, f"values[{index}] with a _deleted that is not false")
    # What a value carries beyond its export line goes, in place: the parsed answer is ours.
    del item["_table"], item["_ts"]
    if "_deleted" in item:
        del item["_deleted"]
    return LiveValue(
        table=table,
        doc_id=doc_id,
        ts=ts,
        deleted=deleted,
        creation_time=_creation_time(item.get("_creationTime")),
        document={} if deleted else item,
    )


def export_order(document: dict[str, Any]) -> tuple[float, str]:
    """Where a document stands in its table's file (SPEC §5): `_creationTime`, then `_id`."""
    doc_id = document.get("_id")
    return _creation_time(document.get("_creationTime")), doc_id if isinstance(doc_id, str) else ""


def _creation_time(value: Any) -> float:
    """The sort position of `_creationTime` (SPEC §5): its number, else 0 (first)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        number = float(value)
    except OverflowError:
        return 0.0
    return number if number == number and abs(number) != float("inf") else 0.0
