"""Closed sets of table names: the export's source tables and the Laravel destination tables."""

from __future__ import annotations

from typing import Final, Literal

SourceTable = Literal["users", "threads", "runs", "messages", "receipts", "blueprints"]
DestinationTable = Literal[
    "users",
    "threads",
    "runs",
    "messages",
    "run_events",
    "agent_conversations",
    "agent_conversation_messages",
    "autopilots",
    "autopilot_profiles",
    "autopilot_policies",
]

# Reading order of the reference importer (§1.3).
SOURCE_TABLES: Final[tuple[SourceTable, ...]] = (
    "users",
    "threads",
    "runs",
    "messages",
    "receipts",
    "blueprints",
)


def read_tables(skip_blueprints: bool) -> tuple[SourceTable, ...]:
    """The source tables an import reads (blueprints not at all with --skip-blueprints): the
    ones whose documents it can find changed, unchanged or vanished."""
    return tuple(t for t in SOURCE_TABLES if not (skip_blueprints and t == "blueprints"))


# An export is importable when it holds at least one of these (SPEC §8.6).
CHAT_TABLES: Final[frozenset[str]] = frozenset({"users", "threads", "runs", "messages", "receipts"})
DESTINATION_TABLES: Final[tuple[DestinationTable, ...]] = (
    "users",
    "threads",
    "runs",
    "messages",
    "run_events",
    "agent_conversations",
    "agent_conversation_messages",
    "autopilots",
    "autopilot_profiles",
    "autopilot_policies",
)
# What `--replace` empties, in the reference's order (§6.3).
REPLACED_TABLES: Final[tuple[DestinationTable, ...]] = (
    "run_events",
    "messages",
    "runs",
    "threads",
    "agent_conversation_messages",
    "agent_conversations",
)
# The document key of each source table (SPEC §8.2): the last line with a key wins.
DOCUMENT_KEYS: Final[dict[SourceTable, str]] = {
    "users": "userId",
    "threads": "threadId",
    "runs": "runId",
    "messages": "messageId",
    "receipts": "_id",
    "blueprints": "_id",
}
