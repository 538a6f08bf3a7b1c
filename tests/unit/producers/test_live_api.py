"""The documented answer shapes of the streaming export API (producers/live_api.py): what a
value must hold, what is stripped before publishing, and which errors mean "start again"."""

from __future__ import annotations

from typing import Any

import pytest

from khala_stream.errors import SourceAnswerError
from producers import live_api


def _deltas(*values: dict[str, Any]) -> dict[str, Any]:
    return {"values": list(values), "cursor": 7, "hasMore": False}


def test_a_value_is_the_export_line_plus_its_metadata() -> None:
    page = live_api.parse_deltas(
        _deltas(
            {"_id": "m1", "_creationTime": 5.5, "_table": "messages", "_ts": 9, "text": "hi"},
            {"_id": "m2", "_table": "messages", "_ts": 10, "_deleted": True},
        )
    )
    changed, deleted = page.values
    assert changed.document == {"_id": "m1", "_creationTime": 5.5, "text": "hi"}
    assert (changed.table, changed.ts, changed.creation_time, changed.deleted) == (
        "messages", 9, 5.5, False,
    )  # fmt: skip
    assert deleted.deleted and deleted.document == {} and deleted.doc_id == "m2"
    assert page.cursor == 7 and not page.has_more


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"_table": "users", "_ts": 1}, "without a string _id"),
        ({"_id": "", "_table": "users", "_ts": 1}, "without a string _id"),
        ({"_id": "a", "_table": "users", "_ts": True}, "without an integer _ts"),
        ({"_id": "a", "_table": "users", "_ts": -1}, "without an integer _ts"),
        ({"_id": "a", "_table": "users", "_ts": 1.5}, "without an integer _ts"),
        ({"_id": "a", "_table": 3, "_ts": 1}, "without a string _table"),
        ({"_id": "a", "_table": "users", "_ts": 1, "_deleted": "yes"}, "_deleted"),
    ],
)
def test_a_value_without_its_metadata_is_an_answer_error(value: dict[str, Any], words: str) -> None:
    with pytest.raises(SourceAnswerError, match="GET /api/document_deltas answered values\\[0\\]"):
        live_api.parse_deltas(_deltas(value))
    with pytest.raises(SourceAnswerError) as caught:
        live_api.parse_deltas(_deltas(value))
    assert words in str(caught.value)


def test_a_snapshot_holds_no_deletion_and_names_its_snapshot() -> None:
    deleted = {"_id": "a", "_table": "users", "_ts": 1, "_deleted": True}
    body = {"values": [deleted], "cursor": "a", "hasMore": False, "snapshot": 1}
    with pytest.raises(SourceAnswerError, match="/api/list_snapshot"):
        live_api.parse_snapshot(body)
    with pytest.raises(SourceAnswerError, match="snapshot that is not"):
        live_api.parse_snapshot({"values": [], "hasMore": False, "snapshot": None})
    page = live_api.parse_snapshot({"values": [], "hasMore": False, "snapshot": "s1"})
    assert page.cursor is None and page.snapshot == "s1"


@pytest.mark.parametrize(
    ("document", "order"),
    [
        ({"_id": "b", "_creationTime": 2}, (2.0, "b")),
        ({"_id": "a", "_creationTime": "2"}, (0.0, "a")),
        ({"_id": "a", "_creationTime": True}, (0.0, "a")),
        ({"_id": "a", "_creationTime": 10**400}, (0.0, "a")),
        ({"_creationTime": 1}, (1.0, "")),
    ],
)
def test_export_order_is_creation_time_then_id(
    document: dict[str, Any], order: tuple[float, str]
) -> None:
    assert live_api.export_order(document) == order


@pytest.mark.parametrize(
    ("status", "body", "snapshot", "cursor"),
    [
        (400, {"code": "SnapshotTooOld", "message": "out of retention"}, True, True),
        (410, {"code": "Gone", "message": "cursor is too old"}, False, True),
        (400, {"code": "BadRequest", "message": "format"}, False, False),
        (500, {"code": "Snapshot", "message": "snapshot"}, False, False),
        (400, "not an object", False, False),
    ],
)
def test_which_errors_start_again_from_a_new_snapshot(
    status: int, body: Any, snapshot: bool, cursor: bool
) -> None:
    assert live_api.snapshot_expired(status, body) is snapshot
    assert live_api.cursor_expired(status, body) is cursor
