"""RowBatch encoding (khala_stream/contract/codec.py): how the derivation's upserts are cut into
messages, and that the sink reads back the very changes that went in."""

from __future__ import annotations

from typing import Any

import orjson

from khala_stream.contract.changes import RowChange, RowUpsert, SourceRef
from khala_stream.contract.codec import (
    read_row_batch,
    row_batch_changes,
    row_batch_headers,
    row_batches,
)


def _upsert(key: str, **values: Any) -> RowUpsert:
    return RowUpsert(
        key, {"id": key, **values}, f"hash-{key}", SourceRef(table="runs", line=7, doc_id=key)
    )


def test_batches_are_cut_by_size_and_by_column_set() -> None:
    rows = [_upsert(f"r{i}", note="x" * 100) for i in range(30)]
    rows.insert(5, _upsert("odd", other=1))  # another column set: a batch of its own
    batches = list(row_batches(3, "runs", rows, max_bytes=1000))
    assert [b.columns for b in batches].count(("id", "other")) == 1
    plain = [b for b in batches if b.columns == ("id", "note")]
    assert len(plain) > 3
    assert all(len(b.rows) <= 1000 for b in plain)
    keys = [row["_k"] for b in plain for row in orjson.loads(b.rows)]
    assert keys == [f"r{i}" for i in range(30)]  # in order, each once


def test_a_row_larger_than_a_batch_goes_alone() -> None:
    batches = list(row_batches(1, "runs", [_upsert("big", note="x" * 5000)], max_bytes=1000))
    assert [len(orjson.loads(b.rows)) for b in batches] == [1]


def test_the_sink_reads_back_the_changes_that_went_in() -> None:
    [batch] = row_batches(3, "runs", [_upsert("r1", meta={"a": [1, None]}, n=2)], 1 << 20)
    read = read_row_batch(row_batch_headers(batch), batch.rows)
    assert read == batch and not read.new
    [new] = row_batches(3, "runs", [_upsert("r2")], 1 << 20, new=True)
    assert read_row_batch(row_batch_headers(new), new.rows) == new
    assert row_batch_changes(batch) == [
        RowChange(
            run_id=3,
            table="runs",
            op="upsert",
            key="r1",
            values={"id": "r1", "meta": {"a": [1, None]}, "n": 2},
            row_hash="hash-r1",
            source=SourceRef(table="runs", line=7, doc_id="r1"),
        )
    ]
    assert read_row_batch([("khala-table", b"runs")], b"[]") is None  # an array of changes
