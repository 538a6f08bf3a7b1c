"""Policy: threads, runs, messages and receipts → Laravel rows (reference §3; SPEC §8).

Pure functions from a document and what is known about its owner to the rows it produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from khala_stream.contract.codec import dumps_text
from processors.fields import (
    ASCII_TRIM,
    CREATED_CHAIN,
    created_at,
    first_usable_ms,
    int_field,
    is_uuid,
    php_truthy,
    string_field,
    updated_at,
)
from processors.text import collapse_whitespace, limit

_RUN_STATUS = {
    "streaming": "running",
    "final": "completed",
    "error": "failed",
    "canceled": "canceled",
}
_FINISHED = frozenset({"completed", "failed", "canceled"})
_EVENT_TYPE = {
    "model": "legacy_receipt_model",
    "tool": "legacy_receipt_tool",
    "dse.predict": "legacy_receipt_dse_predict",
}
ROLES = frozenset({"user", "assistant", "system"})


@dataclass(frozen=True, slots=True)
class Owner:
    """What a thread's rows need to know about its owner and the owner's autopilot."""

    user_id: int
    autopilot_id: str | None
    config_version: int | None


@dataclass(slots=True)
class TitleSeed:
    """The earliest eligible user message of a thread so far (reference §3.2)."""

    sort_key: float
    title: str


def title_candidate(doc: dict[str, Any]) -> tuple[str, float, str] | None:
    """(threadId, sort key, trimmed text) when the message may seed its thread's title."""
    thread_id = string_field(doc, "threadId")
    text = doc.get("text")
    if thread_id is None or string_field(doc, "role") != "user" or not isinstance(text, str):
        return None
    trimmed = text.strip(ASCII_TRIM)
    if not trimmed:
        return None
    created = int_field(doc, "createdAtMs")
    sort_key = float("inf") if created is None else float(created)
    return thread_id, sort_key, trimmed


def title_from(text: str) -> str:
    """The thread title made of its seeding message's trimmed text (reference §3.2)."""
    return limit(collapse_whitespace(text), 120, "…")


def default_title(thread_id: str) -> str:
    return "Conversation " + thread_id[:8]


def thread_rows(
    thread_id: str, doc: dict[str, Any], owner: Owner, title: str, snapshot_ms: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `threads` row and the `agent_conversations` row of an owned thread."""
    created, updated = created_at(doc, snapshot_ms), updated_at(doc, snapshot_ms)
    thread = {
        "id": thread_id,
        "user_id": owner.user_id,
        "autopilot_id": owner.autopilot_id,
        "title": title,
        "created_at": created,
        "updated_at": updated,
    }
    conversation = {
        "id": thread_id,
        "user_id": owner.user_id,
        "title": title,
        "created_at": created,
        "updated_at": updated,
    }
    return thread, conversation


def document_refs(table: str, key: str, doc: dict[str, Any]) -> tuple[str, str, bool]:
    """(thread, link, timeless) of a stored document, '' for none: the thread whose rows it
    may change (a thread: its own key); the run it names (a thread: its owner); timeless when
    it has no usable creation time, so its rows take the export's snapshot time."""
    if table == "users":
        return "", "", False
    thread = key if table == "threads" else string_field(doc, "threadId") or ""
    link = ""
    if table == "threads":
        link = string_field(doc, "ownerId") or ""
    elif table in ("runs", "messages", "receipts"):
        link = string_field(doc, "runId") or ""
    timeless = first_usable_ms(doc, CREATED_CHAIN, 0) == 0
    return thread, link, timeless


def run_keys(doc: dict[str, Any]) -> tuple[str, str] | None:
    """(threadId, runId) of a run or receipt whose runId is UUID-shaped, else None."""
    thread_id, run_id = string_field(doc, "threadId"), string_field(doc, "runId")
    if thread_id is None or run_id is None or not is_uuid(run_id):
        return None
    return thread_id, run_id


def run_row(
    run_id: str, thread_id: str, doc: dict[str, Any], owner: Owner, snapshot_ms: int
) -> dict[str, Any]:
    source_status = string_field(doc, "status")
    status = _RUN_STATUS.get(source_status or "", "completed")
    created, updated = created_at(doc, snapshot_ms), updated_at(doc, snapshot_ms)
    return {
        "id": run_id,
        "thread_id": thread_id,
        "user_id": owner.user_id,
        "autopilot_id": owner.autopilot_id,
        "autopilot_config_version": owner.config_version,
        "status": status,
        "model_provider": None,
        "model": None,
        "usage": None,
        "meta": {
            "source": "khala",
            "sourceStatus": source_status,
            "assistantMessageId": string_field(doc, "assistantMessageId"),
            "cancelRequested": php_truthy(doc.get("cancelRequested")),
        },
        "error": None,
        "started_at": created,
        "completed_at": updated if status in _FINISHED else None,
        "created_at": created,
        "updated_at": updated,
    }


def message_keys(doc: dict[str, Any]) -> tuple[str, str, str] | None:
    """(threadId, messageId, role) of an importable message, else None."""
    thread_id, message_id = string_field(doc, "threadId"), string_field(doc, "messageId")
    role = string_field(doc, "role")
    if thread_id is None or message_id is None or role not in ROLES:
        return None
    assert role is not None
    return thread_id, message_id, role


def message_rows(
    message_id: str,
    thread_id: str,
    role: str,
    doc: dict[str, Any],
    owner: Owner,
    linked_run_id: str | None,
    snapshot_ms: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `messages` row and the `agent_conversation_messages` row of a message."""
    text = doc.get("text")
    content = text if isinstance(text, str) else ""
    meta = {
        "source": "khala",
        "sourceStatus": string_field(doc, "status"),
        "sourceRunId": string_field(doc, "runId"),
    }
    created, updated = created_at(doc, snapshot_ms), updated_at(doc, snapshot_ms)
    message = {
        "id": message_id,
        "thread_id": thread_id,
        "run_id": linked_run_id,
        "user_id": owner.user_id,
        "autopilot_id": owner.autopilot_id,
        "role": role,
        "content": content,
        "meta": meta,
        "created_at": created,
        "updated_at": updated,
    }
    conversation_message = {
        "id": message_id,
        "conversation_id": thread_id,
        "user_id": owner.user_id,
        "agent": "autopilot",
        "role": role,
        "content": content,
        "attachments": "[]",
        "tool_calls": "[]",
        "tool_results": "[]",
        "usage": "{}",
        "meta": dumps_text(meta),
        "created_at": created,
        "updated_at": updated,
    }
    return message, conversation_message


def event_row(
    run_id: str, thread_id: str, doc: dict[str, Any], owner: Owner, snapshot_ms: int
) -> dict[str, Any]:
    """The `run_events` row of a receipt (its id is allocated by the sink)."""
    kind = string_field(doc, "kind") or "unknown"
    return {
        "thread_id": thread_id,
        "run_id": run_id,
        "user_id": owner.user_id,
        "autopilot_id": owner.autopilot_id,
        "actor_type": "autopilot" if owner.autopilot_id else "user",
        "actor_autopilot_id": owner.autopilot_id,
        "type": _EVENT_TYPE.get(kind, "legacy_receipt"),
        "payload": {
            "source": "khala_receipt",
            "kind": kind,
            "receiptId": string_field(doc, "receiptId"),
            "signatureId": string_field(doc, "signatureId"),
            "compiledId": string_field(doc, "compiled_id"),
            "json": doc.get("json"),
        },
        "created_at": created_at(doc, snapshot_ms),
    }
