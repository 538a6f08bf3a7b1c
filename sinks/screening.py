"""Changes-topic records the sink may apply, and the ones it must set aside.

A record that is not a valid change message in the codec would fail its batch on every
delivery (the stage would exit, restart at the same offset and exit again); a change that
breaks `change_rules` must never reach the database. Either way the whole record becomes a
dead letter (a record holding one forged change is not trusted for the others), and the
sink's position moves past it with the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import ConsumerRecord

from khala_stream.contract import RowChange
from khala_stream.contract.codec import (
    CheckedRowBatch,
    CodecError,
    check_row_batch,
    decode_changes,
    read_row_batch,
)
from khala_stream.contract.dead_letters import DeadLetter, ReasonCode
from khala_stream.dead_letters import record_letter
from khala_stream.runtime import Batch
from sinks.change_rules import forbidden, forbidden_table


@dataclass(slots=True)
class ScreenedChanges:
    changes: list[RowChange] = field(default_factory=list)
    row_batches: list[CheckedRowBatch] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)


def screen_changes(batch: Batch) -> ScreenedChanges:
    """The batch's records as changes and row batches to apply, and dead letters for the
    records that are neither or that the sink must not apply. Records without a value are
    skipped (nothing to apply, nothing to keep)."""
    screened = ScreenedChanges()
    for records in batch.values():
        for r in records:
            if not r.value:
                continue
            try:
                batch_of = read_row_batch(r.headers, r.value)
                # A row batch is decoded here once, and written from what is decoded.
                row_batch = check_row_batch(batch_of) if batch_of is not None else None
                changes = decode_changes(r.value) if row_batch is None else []
            except CodecError as exc:
                screened.letters.append(_letter(r, "undecodable_record", str(exc)))
                continue
            if (why := _forbidden(row_batch, changes)) is not None:
                screened.letters.append(_letter(r, "forbidden_change", why))
            elif row_batch is not None:
                screened.row_batches.append(row_batch)
            else:
                screened.changes += changes
    return screened


def _forbidden(row_batch: CheckedRowBatch | None, changes: list[RowChange]) -> str | None:
    if row_batch is not None:
        return forbidden_table(row_batch.batch.table, row_batch.batch.columns)
    return next((why for c in changes if (why := forbidden(c)) is not None), None)


def _letter(r: ConsumerRecord[bytes, bytes], code: ReasonCode, reason: str) -> DeadLetter:
    return record_letter("sink", r, code, reason, table="changes")
