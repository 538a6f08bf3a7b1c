"""RowBatch encoding (khala_stream/contract/codec.py): how the derivation's upserts are cut into
messages, and that the sink reads back the very changes that went in."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from khala_stream.contract.changes import RowBatch, RowChange, RowUpsert, SourceRef
from khala_stream.contract.codec import (
    CodecError,
    check_row_batch,
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


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        (b'{"id": "r1"}', "not a JSON array"),
        (b'[["r1"]]', "not an object of the batch's columns"),
        (b'[{"id": "r1", "colour": "red", "_k": "r1", "_h": "h", "_s": ["runs", 1, null]}]',
         "not an object of the batch's columns"),
        (b'[{"id": "r1", "_h": "h", "_s": ["runs", 1, null]}]', "lacks its ledger key"),
        (b'[{"id": "r1", "_k": "r1", "_h": 7, "_s": ["runs", 1, null]}]', "lacks its ledger key"),
        (b'[{"id": "r1", "_k": "r1", "_h": "h", "_s": ["runs", "1", null]}]', "lacks its ledger"),
        (b'[{"id": "r1", "_k": "r1", "_h": "h"}]', "lacks its ledger key, hash or source"),
    ],
)  # fmt: skip
def test_a_row_batch_whose_rows_are_not_the_contract_is_refused_whole(
    rows: bytes, reason: str
) -> None:
    batch = RowBatch(run_id=3, table="runs", columns=("id",), rows=rows)
    with pytest.raises(CodecError, match=reason):
        check_row_batch(batch)
    with pytest.raises(CodecError, match=reason):
        row_batch_changes(batch)


def test_a_checked_batch_keeps_the_rows_it_decoded() -> None:
    [batch] = row_batches(3, "runs", [_upsert("r1", n=1), _upsert("r2", n=2)], 1 << 20)
    checked = check_row_batch(batch)
    assert checked.batch == batch
    assert [(r["_k"], r["n"]) for r in checked.rows] == [("r1", 1), ("r2", 2)]
    assert row_batch_changes(checked) == row_batch_changes(batch)
