"""The run-coordination records (khala_stream/contract/runs.py) through the codec: what is
written is read back the same; the untyped shape stored before records had a version (0) is
still read; a version this khala-stream does not know is refused with a clear error."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from khala_stream.contract import codec
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from khala_stream.errors import RuntimeFailure, UnknownRecordVersion

SHA = "ab" * 32

MANIFEST = PublishManifest(
    run_id=7,
    export_sha256=SHA,
    published={"messages": 3, "users": 1},
    source={"messages": 4, "users": 1},
    rejected={"messages": 1},
    missing_key={"users": 0},
    unchanged={"messages": 2},
    rejected_lines=[("messages.jsonl", 3, "not JSON: unexpected end")],
    tables=["messages", "users"],
    ignored_tables=["lightningInvoices"],
    order={"messages": "cd" * 32},
    entries={"messages": "ef" * 32, "users": "01" * 32},
    carried={"users": 5},
    patched={"runs": 4},
)

SUMMARY = DerivationSummary(
    counters={"messages_imported": 3, "users_imported": 1},
    written={"messages": 3},
    documents={"messages": {"inserted": 1, "updated": 0, "unchanged": 2, "deleted": 0}},
    fingerprint={"snapshot_ms": 5, "allowed_hosts": ["a.example"], "skip_blueprints": False},
    skipped=True,
)


def test_a_manifest_round_trips_with_its_version() -> None:
    data = codec.encode_manifest(MANIFEST)
    assert orjson.loads(data)["v"] == codec.MANIFEST_VERSION
    assert codec.decode_manifest(data, run_id=0, export_sha256="") == MANIFEST


def test_a_summary_round_trips_with_its_version() -> None:
    data = codec.encode_summary(SUMMARY)
    assert orjson.loads(data)["v"] == codec.SUMMARY_VERSION
    assert codec.decode_summary(data, run_id=7) == SUMMARY


def test_a_manifest_stored_before_versions_is_read() -> None:
    """What `khala_import_runs.expected` held: the publish report without run or version."""
    stored = {
        "published": {"messages": 3, "users": 1},
        "source": {"messages": 4, "users": 1},
        "rejected": {"messages": 1},
        "missing_key": {"users": 0},
        "unchanged": {"messages": 2},
        "rejected_lines": [["messages.jsonl", 3, "not JSON: unexpected end"]],
        "tables": ["messages", "users"],
        "ignored_tables": ["lightningInvoices"],
        "order": {"messages": "cd" * 32},
    }
    decoded = codec.decode_manifest(orjson.dumps(stored), run_id=7, export_sha256=SHA)
    assert decoded == dataclasses.replace(MANIFEST, entries={}, carried={}, patched={})


def test_a_summary_stored_before_versions_is_read() -> None:
    """What `khala_import_runs.counters` held: the counters beside the other members."""
    stored = {
        "messages_imported": 3,
        "users_imported": 1,
        "written": {"messages": 3},
        "documents": {"messages": {"inserted": 1, "updated": 0, "unchanged": 2, "deleted": 0}},
        "options": {"snapshot_ms": 5, "allowed_hosts": ["a.example"], "skip_blueprints": False},
        "derivation_skipped": True,
    }
    assert codec.decode_summary(orjson.dumps(stored).decode(), run_id=7) == SUMMARY


def test_a_version_1_manifest_carries_no_table() -> None:
    stored = {**orjson.loads(codec.encode_manifest(MANIFEST)), "v": 1}
    del stored["entries"], stored["carried"]
    manifest = codec.decode_manifest(orjson.dumps(stored), run_id=7, export_sha256=SHA)
    assert manifest.carried == {} and manifest.entries == {}
    assert manifest.generation("users") == 7


def test_a_carried_table_is_read_from_the_run_it_was_carried_from() -> None:
    assert MANIFEST.generation("users") == 5
    assert MANIFEST.generation("messages") == 7


def test_a_patched_table_is_read_from_the_run_it_amends() -> None:
    assert MANIFEST.generation("runs") == 4
    assert MANIFEST.generations() == {"users": 5, "runs": 4}


def test_a_version_2_manifest_patches_no_table() -> None:
    stored = {**orjson.loads(codec.encode_manifest(MANIFEST)), "v": 2}
    del stored["patched"]
    manifest = codec.decode_manifest(orjson.dumps(stored), run_id=7, export_sha256=SHA)
    assert manifest.patched == {} and manifest.generation("runs") == 7


@pytest.mark.parametrize("version", [4, 99, -1, "1", None, True])
def test_an_unknown_manifest_version_is_a_clear_error(version: object) -> None:
    data = orjson.dumps({**orjson.loads(codec.encode_manifest(MANIFEST)), "v": version})
    with pytest.raises(UnknownRecordVersion) as raised:
        codec.decode_manifest(data, run_id=7, export_sha256=SHA)
    assert isinstance(raised.value, RuntimeFailure) and raised.value.exit_code == 1
    message = str(raised.value)
    assert f"the publish manifest of run 7 has version {version!r}" in message
    assert f"reads versions up to {codec.MANIFEST_VERSION}" in message


@pytest.mark.parametrize("version", [2, 99])
def test_an_unknown_summary_version_is_a_clear_error(version: int) -> None:
    data = orjson.dumps({**orjson.loads(codec.encode_summary(SUMMARY)), "v": version})
    with pytest.raises(
        UnknownRecordVersion, match=f"derivation summary of run 3 has version {version}"
    ):
        codec.decode_summary(data, run_id=3)


def test_a_record_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(UnknownRecordVersion, match="derivation summary of run 3"):
        codec.decode_summary(b"[1, 2]", run_id=3)
