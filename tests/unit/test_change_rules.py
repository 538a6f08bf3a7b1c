"""What the sink may apply (sinks/change_rules.py) and what the codec reads as a change."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from khala_stream.contract import DESTINATION_TABLES, REPLACED_TABLES, RowChange
from khala_stream.contract.codec import CodecError, decode_changes, encode_change
from khala_stream.contract.documents import (
    Provenance,
    ProvenanceError,
    document_headers,
    read_headers,
)
from sinks.change_rules import forbidden


def _change(table: str, op: str, **values: object) -> RowChange:
    return RowChange(run_id=1, table=table, op=op, key="k", values=values)  # type: ignore[arg-type]


def test_what_the_processor_emits_is_allowed() -> None:
    assert [forbidden(_change(t, "truncate")) for t in REPLACED_TABLES] == [None] * 6
    assert forbidden(_change("threads", "upsert", title="t", user_id=1)) is None
    assert forbidden(_change("users", "update", email="e")) is None
    assert all(forbidden(_change(t, "delete")) is None for t in DESTINATION_TABLES)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_change("users", "truncate"), "truncate of users refused"),
        (_change("autopilots", "truncate"), "truncate of autopilots refused"),
        (_change("migrations", "truncate"), "table 'migrations' is not one of the ten"),
        (_change("pg_catalog.pg_class", "delete"), "is not one of the ten"),
        (_change("threads", "drop"), "unknown operation 'drop'"),
        (_change("threads", "update", colour="red"), "unknown column threads.colour"),
    ],
)
def test_a_forged_change_is_refused_with_its_reason(change: RowChange, why: str) -> None:
    assert why in (forbidden(change) or "")


@pytest.mark.parametrize(
    "value",
    [
        b"\xff",
        b"{}",
        b"[1]",
        b'[{"run": true, "table": "threads", "op": "delete", "key": "k"}]',
        b'[{"run": 4294967296, "table": "threads", "op": "delete", "key": "k"}]',
        b'[{"run": 1, "table": "threads", "op": "delete", "key": 7}]',
        b'[{"run": 1, "table": "threads", "op": "upsert", "key": "k", "values": [1]}]',
        b'[{"run": 1, "table": "threads", "op": "delete", "key": "k", "src": ["t", "one", null]}]',
    ],
)
def test_the_codec_refuses_what_is_not_a_changes_message(value: bytes) -> None:
    with pytest.raises(CodecError):
        decode_changes(value)


def test_the_codec_reads_back_what_it_wrote() -> None:
    change = _change("threads", "upsert", title="t")
    assert decode_changes(b"[" + encode_change(change) + b"]") == [change]
    assert decode_changes(orjson.dumps([])) == []


def test_provenance_headers_are_checked() -> None:
    good = Provenance(
        export_sha256="e" * 64, run_id=3, table="runs", line=1, doc_id=None, content_hash="a" * 64
    )
    assert read_headers(document_headers(good)) == good
    for name, value in [
        ("khala-run", b"0"),
        ("khala-line", b"1e3"),
        ("khala-table", b"x"),
        ("khala-table", b"runs\0"),
        ("khala-table", None),
        ("khala-hash", b"a" * 63),
        ("khala-hash", b"A" * 64),
        ("khala-hash", b"a" * 64 + b"\n"),
        ("khala-hash", None),
    ]:
        headers = dict(document_headers(good)) | {name: value}
        with pytest.raises(ProvenanceError, match=name):
            read_headers(list(headers.items()))  # type: ignore[arg-type]


def test_an_amendments_headers_name_an_earlier_generation() -> None:
    """A `follow` amendment's document names the earlier run it amends; its tombstone says
    so too, and neither may name this run or a later one."""
    base = Provenance(
        export_sha256="e" * 64, run_id=3, table="runs", line=1, doc_id=None, content_hash="a" * 64
    )
    amended = dataclasses.replace(base, generation=2)
    tombstone = dataclasses.replace(base, generation=2, deleted=True)
    assert read_headers(document_headers(amended)) == amended
    assert read_headers(document_headers(tombstone)) == tombstone
    bad = [
        (dict(document_headers(amended)) | {"khala-generation": b"3"}, "names no earlier run"),
        (dict(document_headers(amended)) | {"khala-generation": b"0"}, "khala-generation"),
        (dict(document_headers(tombstone)) | {"khala-deleted": b"yes"}, "is not 1"),
        (dict(document_headers(base)) | {"khala-deleted": b"1"}, "without its khala-generation"),
    ]
    for headers, why in bad:
        with pytest.raises(ProvenanceError, match=why):
            read_headers(list(headers.items()))
