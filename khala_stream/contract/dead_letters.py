"""DeadLetter: what could not be imported, with enough to see why and to retry it (SPEC §3.2)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

import orjson

ReasonCode = Literal[
    "invalid_utf8",  # a line that is not UTF-8
    "invalid_json",  # a line that is not JSON
    "not_object",  # JSON, but not an object
    "too_long",  # a line longer than a document may be (its first bytes are kept)
    "too_deep",  # an object nested deeper than a document may be
    "holds_nul",  # a string holding U+0000, which PostgreSQL text cannot store
    "missing_key",  # an object without the key field of its table
    "db_refused",  # a row the database refused (too long, out of range, ...)
]
Stage = Literal["publish", "sink"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    stage: Stage
    reason_code: ReasonCode
    reason: str
    raw: bytes
    """The line's bytes (publish) or the encoded RowChange (sink)."""
    table: str
    entry: str | None = None
    line: int | None = None
    doc_id: str | None = None
    export_sha256: str | None = None
    run_id: int | None = None

    @property
    def location(self) -> str:
        where = self.entry or self.table
        return f"{where}:{self.line}" if self.line is not None else where


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "stage": letter.stage,
            "reason_code": letter.reason_code,
            "reason": letter.reason,
            "raw": base64.b64encode(letter.raw).decode(),
            "table": letter.table,
            "entry": letter.entry,
            "line": letter.line,
            "doc_id": letter.doc_id,
            "export_sha256": letter.export_sha256,
            "run_id": letter.run_id,
        }
    )


def decode_dead_letter(data: bytes) -> DeadLetter:
    raw = orjson.loads(data)
    return DeadLetter(
        stage=raw["stage"],
        reason_code=raw["reason_code"],
        reason=raw["reason"],
        raw=base64.b64decode(raw["raw"]),
        table=raw["table"],
        entry=raw.get("entry"),
        line=raw.get("line"),
        doc_id=raw.get("doc_id"),
        export_sha256=raw.get("export_sha256"),
        run_id=raw.get("run_id"),
    )
