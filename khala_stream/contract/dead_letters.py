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
    "undecodable_record",  # a topic record its stage cannot decode (bad headers or value)
    "forbidden_change",  # a change the sink must not apply (table, operation or column)
]
Stage = Literal["publish", "process", "sink"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    stage: Stage
    reason_code: ReasonCode
    reason: str
    raw: bytes
    """The line's bytes (publish), the encoded RowChange (db_refused), or the record's value
    (undecodable_record, forbidden_change)."""
    table: str
    entry: str | None = None
    line: int | None = None
    doc_id: str | None = None
    export_sha256: str | None = None
    run_id: int | None = None
    # Where a record a stage set aside was read (undecodable_record, forbidden_change).
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None

    @property
    def location(self) -> str:
        if self.source_topic is not None:
            return (
                f"{self.source_topic} partition {self.source_partition}"
                f" offset {self.source_offset}"
            )
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
            "source_topic": letter.source_topic,
            "source_partition": letter.source_partition,
            "source_offset": letter.source_offset,
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
        source_topic=raw.get("source_topic"),
        source_partition=raw.get("source_partition"),
        source_offset=raw.get("source_offset"),
    )
