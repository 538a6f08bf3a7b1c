"""The only place that turns contract values into bytes and back (orjson, compact)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from khala_stream.contract.changes import RowChange, SourceRef

_SORTED = orjson.OPT_SORT_KEYS


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


def _change_from(raw: dict[str, Any]) -> RowChange:
    src = raw.get("src")
    return RowChange(
        run_id=int(raw["run"]),
        table=raw["table"],
        op=raw["op"],
        key=raw["key"],
        values=raw.get("values") or {},
        row_hash=raw.get("hash"),
        source=SourceRef(table=src[0], line=int(src[1]), doc_id=src[2]) if src else None,
        schema_version=int(raw.get("v", 1)),
    )


def encode_change(change: RowChange) -> bytes:
    return orjson.dumps(_change_dict(change))


def decode_change(data: bytes) -> RowChange:
    return _change_from(orjson.loads(data))


def decode_changes(data: bytes) -> list[RowChange]:
    """A message of the changes topic: a JSON array of encoded changes (README)."""
    return [_change_from(raw) for raw in orjson.loads(data)]
