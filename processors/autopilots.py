"""Policy: blueprint → autopilot profile and policy payloads (reference §5; SPEC §3.6–3.9).

Pure functions: the runner looks up existing rows and decides what to write.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from processors.fields import ASCII_TRIM, int_field, string_field
from processors.text import collapse_whitespace, limit

# Namespace of the deterministic autopilot ids (SPEC §3.6): uuid5(namespace, owner WorkOS id).
AUTOPILOT_NAMESPACE = uuid.UUID("6f1c2d4e-8a5b-4c3d-9e7f-0a1b2c3d4e5f")
PROFILE_COLUMNS = (
    "owner_display_name",
    "persona_summary",
    "autopilot_voice",
    "principles",
    "preferences",
    "onboarding_answers",
    "schema_version",
)


@dataclass(frozen=True, slots=True)
class Blueprint:
    """The chosen blueprint of a thread: its payload and how recent it is."""

    payload: dict[str, Any]
    recency: int
    line: int


def autopilot_id_for(owner_workos_id: str) -> str:
    return str(uuid.uuid5(AUTOPILOT_NAMESPACE, owner_workos_id))


def extract_blueprint(doc: dict[str, Any], line: int) -> tuple[str, Blueprint] | None:
    """(threadId, blueprint) for a blueprints document, or None when it carries no payload."""
    thread_id = string_field(doc, "threadId")
    if thread_id is None:
        return None
    body = doc.get("blueprint")
    if isinstance(body, dict):
        payload = body
    elif isinstance(doc.get("docs"), dict):
        # Legacy shape: the parts sit at the top level of the document.
        state = doc.get("bootstrapState")
        memory = doc.get("memory")
        payload = {
            "docs": doc["docs"],
            "bootstrapState": state if isinstance(state, dict) else None,
            "memory": memory if memory is not None else [],
        }
    else:
        return None
    recency = int_field(doc, "updatedAtMs")
    if recency is None:
        recency = int_field(doc, "_creationTime")
    return thread_id, Blueprint(payload=payload, recency=recency or 0, line=line)


def _section(parent: dict[str, Any], name: str) -> dict[str, Any]:
    value = parent.get(name)
    return value if isinstance(value, dict) else {}


def _non_blank_strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and v.strip(ASCII_TRIM)]


def profile_payload(blueprint: dict[str, Any] | None, owner_name: str | None) -> dict[str, Any]:
    payload = blueprint or {}
    docs = _section(payload, "docs")
    user, identity = _section(docs, "user"), _section(docs, "identity")
    character, rules = _section(docs, "character"), _section(docs, "rules")
    display = (
        string_field(user, "addressAs")
        or string_field(user, "name")
        or (owner_name if owner_name else None)
        or "Autopilot Owner"
    )
    voice = string_field(identity, "vibe") or string_field(character, "vibe")
    principles = _non_blank_strings(character.get("coreTruths"))
    boundaries = _non_blank_strings(character.get("boundaries"))
    rules_body = string_field(rules, "body")
    parts: list[str] = []
    if (name := string_field(identity, "name")) is not None:
        parts.append(f"Identity: {name}")
    if voice is not None:
        parts.append(f"Voice: {voice}")
    if principles:
        parts.append("Core truths: " + " | ".join(principles))
    if boundaries:
        parts.append("Boundaries: " + " | ".join(boundaries))
    if rules_body is not None:
        parts.append("Rules: " + collapse_whitespace(rules_body))
    state = payload.get("bootstrapState")
    return {
        "owner_display_name": limit(display, 120),
        "persona_summary": limit(" || ".join(parts), 2000) if parts else None,
        "autopilot_voice": voice,
        "principles": principles,
        "preferences": {
            "user": {
                k: string_field(user, k)
                for k in ("name", "addressAs", "pronouns", "timeZone", "context", "notes")
            },
            "character": {
                "boundaries": boundaries,
                "continuity": string_field(character, "continuity"),
                "vibe": string_field(character, "vibe"),
            },
            "identity": {k: string_field(identity, k) for k in ("name", "emoji", "creature")},
        },
        "onboarding_answers": {
            "bootstrapState": state if isinstance(state, dict) else {},
            "user": {
                k: string_field(user, k) for k in ("name", "addressAs", "pronouns", "timeZone")
            },
            "identity": {
                "name": string_field(identity, "name"),
                "vibe": string_field(identity, "vibe"),
            },
        },
        "schema_version": 1,
    }


def policy_payload(blueprint: dict[str, Any] | None, allowed_hosts: list[str]) -> dict[str, Any]:
    docs = _section(blueprint or {}, "docs")
    return {
        "model_provider": None,
        "model": None,
        "tool_allowlist": [],
        "tool_denylist": [],
        "l402_require_approval": True,
        "l402_max_spend_msats_per_call": None,
        "l402_max_spend_msats_per_day": None,
        "l402_allowed_hosts": allowed_hosts,
        "data_policy": {
            "source": "khala_blueprint",
            "rules": string_field(_section(docs, "rules"), "body"),
            "continuity": string_field(_section(docs, "character"), "continuity"),
        },
    }


def parse_allowed_hosts(raw: str) -> list[str]:
    """L402_ALLOWLIST_HOSTS: lower-cased, trimmed, blanks dropped, de-duplicated, order kept."""
    hosts: list[str] = []
    for part in raw.split(","):
        host = part.strip(ASCII_TRIM).lower()
        if host and host not in hosts:
            hosts.append(host)
    return hosts
