"""RowChange: one computed change to one destination row, the processors' output.

A change is fully resolved: every value is what the row must hold (user ids and autopilot ids
already known), so the sink only has to apply it. Values are JSON-able: timestamps are
`YYYY-MM-DD HH:MM:SS` strings (UTC, whole seconds), JSON columns hold decoded values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from khala_stream.contract.tables import DestinationTable

ChangeOp = Literal[
    # Insert or overwrite the row identified by `key`; record `row_hash` in the row ledger.
    "upsert",
    # Update only the columns in `values` of the row whose primary key is `key`; no ledger.
    "update",
    # Delete the row identified by `key` and forget its ledger entry (--propagate-deletes).
    "delete",
    # Empty the table and its ledger entries (--replace); `key` is empty.
    "truncate",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceRef:
    """Where a change came from, for dead letters: the export document that produced it."""

    table: str
    line: int
    doc_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RowChange:
    """One change to one row of a Laravel table.

    `key` is the row's ledger key: the primary key for most tables, `workos_id` for users,
    the receipt `_id` (or content key) for run_events, whose numeric id the sink allocates.
    """

    run_id: int
    table: DestinationTable
    op: ChangeOp
    key: str
    values: dict[str, Any] = field(default_factory=dict)
    row_hash: str | None = None
    source: SourceRef | None = None
    schema_version: int = 1


@dataclass(frozen=True, slots=True)
class RowUpsert:
    """One computed row to upsert, before encoding: its ledger key, value and hash."""

    key: str
    values: dict[str, Any]
    row_hash: str
    source: SourceRef


@dataclass(frozen=True, slots=True, kw_only=True)
class RowBatch:
    """A message of upserts to one table from one run, every row with the same `columns`.

    The derivation's bulk output (threads, runs, messages, their conversation rows, and the
    run events of a first import): the sink hands `rows` to PostgreSQL as they are, without
    an object per row. `rows` is a JSON array of objects holding the columns, plus `_k`
    (ledger key), `_h` (row hash) and `_s` (the source document: table, line, `_id`). Each
    row is the upsert `RowChange` that `codec.row_batch_changes` gives back.

    `new`: the table held no row and no ledger entry when the derivation began, so these
    rows are most likely not there yet: the sink tries plain INSERTs first (and gives new
    run events the next ids itself).
    """

    run_id: int
    table: DestinationTable
    columns: tuple[str, ...]
    rows: bytes
    new: bool = False
