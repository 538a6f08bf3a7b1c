"""The ten Laravel tables the importer writes, exactly as the migrations make them (reference §2).

Laravel semantics rendered in SQLAlchemy Core:

- `id()` is a bigint auto-increment primary key: BIGSERIAL on PostgreSQL, and on SQLite
  `INTEGER PRIMARY KEY AUTOINCREMENT` (SQLite only aliases the rowid for the exact type INTEGER).
- `string(n)` is VARCHAR(n); `json` is PostgreSQL `json` (not jsonb) and TEXT on SQLite.
- Timestamps are `timestamp(0) without time zone` on PostgreSQL; on SQLite a DATETIME stored as
  exactly `YYYY-MM-DD HH:MM:SS`, which is what Laravel writes there.
- Unsigned integers are plain INTEGER / BIGINT / SMALLINT; defaults are server defaults.
- Index and unique-constraint names follow Laravel (`<table>_<cols>_index`, `..._unique`).
- No foreign keys: every reference between these tables is logical.
"""

from __future__ import annotations

import re
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import TypeEngine

__all__ = [
    "LARAVEL",
    "TABLES",
    "boolean_columns",
    "json_columns",
    "primary_key",
    "timestamp_columns",
]

LARAVEL: Final = sa.MetaData()

_KIND = "khala_kind"  # Column.info key: "json" | "timestamp" | "boolean"

# `DATETIME.__init__` is untyped in SQLAlchemy's stubs.
_SQLITE_DATETIME: Final[Any] = sqlite.DATETIME
SQLITE_TIMESTAMP: Final[sqlite.DATETIME] = _SQLITE_DATETIME(
    storage_format="%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d",
    regexp=re.compile(r"(\d+)-(\d+)-(\d+) (\d+):(\d+):(\d+)"),
)
_TIMESTAMP: Final[TypeEngine[Any]] = (
    sa.DateTime()
    .with_variant(postgresql.TIMESTAMP(timezone=False, precision=0), "postgresql")
    .with_variant(SQLITE_TIMESTAMP, "sqlite")
)
_JSON: Final[TypeEngine[Any]] = sa.Text().with_variant(postgresql.JSON(), "postgresql")
_BIG_ID: Final[TypeEngine[Any]] = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _id() -> sa.Column[Any]:
    return sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True)


def _string(name: str, length: int = 255, *, nullable: bool = False, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, sa.String(length), nullable=nullable, **kw)


def _uuid_pk(name: str = "id") -> sa.Column[Any]:
    return sa.Column(name, sa.String(36), primary_key=True, autoincrement=False)


def _timestamp(name: str, *, nullable: bool = True, **kw: Any) -> sa.Column[Any]:
    return sa.Column(name, _TIMESTAMP, nullable=nullable, info={_KIND: "timestamp"}, **kw)


def _json(name: str) -> sa.Column[Any]:
    return sa.Column(name, _JSON, nullable=True, info={_KIND: "json"})


def _timestamps() -> list[sa.Column[Any]]:
    return [_timestamp("created_at"), _timestamp("updated_at")]


def _index(table: str, *cols: str) -> sa.Index:
    return sa.Index(f"{table}_{'_'.join(cols)}_index", *cols)


def _unique(table: str, *cols: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*cols, name=f"{table}_{'_'.join(cols)}_unique")


USERS: Final = sa.Table(
    "users",
    LARAVEL,
    _id(),
    _string("name"),
    _string("email"),
    _string("handle", 64, nullable=True),
    _timestamp("email_verified_at"),
    _string("workos_id"),
    _string("remember_token", 100, nullable=True),
    sa.Column("avatar", sa.Text(), nullable=False),
    *_timestamps(),
    _unique("users", "email"),
    _unique("users", "handle"),
    _unique("users", "workos_id"),
    sqlite_autoincrement=True,
)

THREADS: Final = sa.Table(
    "threads",
    LARAVEL,
    _uuid_pk(),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    _string("autopilot_id", 36, nullable=True),
    _string("title"),
    *_timestamps(),
    _index("threads", "user_id"),
    _index("threads", "autopilot_id"),
    _index("threads", "user_id", "updated_at"),
)

RUNS: Final = sa.Table(
    "runs",
    LARAVEL,
    _uuid_pk(),
    _string("thread_id", 36),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    _string("autopilot_id", 36, nullable=True),
    sa.Column("autopilot_config_version", sa.Integer(), nullable=True),
    _string("status", 32),
    _string("model_provider", nullable=True),
    _string("model", nullable=True),
    _json("usage"),
    _json("meta"),
    sa.Column("error", sa.Text(), nullable=True),
    _timestamp("started_at"),
    _timestamp("completed_at"),
    *_timestamps(),
    _index("runs", "thread_id"),
    _index("runs", "user_id"),
    _index("runs", "autopilot_id"),
    _index("runs", "status"),
    _index("runs", "thread_id", "created_at"),
)

MESSAGES: Final = sa.Table(
    "messages",
    LARAVEL,
    _uuid_pk(),
    _string("thread_id", 36),
    _string("run_id", 36, nullable=True),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    _string("autopilot_id", 36, nullable=True),
    _string("role", 25),
    sa.Column("content", sa.Text(), nullable=False),
    _json("meta"),
    *_timestamps(),
    _index("messages", "thread_id"),
    _index("messages", "run_id"),
    _index("messages", "user_id"),
    _index("messages", "autopilot_id"),
    _index("messages", "thread_id", "created_at"),
)

RUN_EVENTS: Final = sa.Table(
    "run_events",
    LARAVEL,
    _id(),
    _string("thread_id", 36),
    _string("run_id", 36),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    _string("autopilot_id", 36, nullable=True),
    _string("actor_type", 16, server_default=sa.text("'user'")),
    _string("actor_autopilot_id", 36, nullable=True),
    _string("type", 64),
    _json("payload"),
    _timestamp("created_at", nullable=False, server_default=sa.text("CURRENT_TIMESTAMP")),
    _index("run_events", "thread_id"),
    _index("run_events", "run_id"),
    _index("run_events", "user_id"),
    _index("run_events", "autopilot_id"),
    _index("run_events", "actor_autopilot_id"),
    _index("run_events", "type"),
    _index("run_events", "run_id", "id"),
    _index("run_events", "autopilot_id", "created_at"),
    _index("run_events", "autopilot_id", "type", "id"),
    _index("run_events", "actor_type", "id"),
    _index("run_events", "actor_autopilot_id", "id"),
    sqlite_autoincrement=True,
)

AGENT_CONVERSATIONS: Final = sa.Table(
    "agent_conversations",
    LARAVEL,
    _uuid_pk(),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    _string("title"),
    *_timestamps(),
    _index("agent_conversations", "user_id", "updated_at"),
)

AGENT_CONVERSATION_MESSAGES: Final = sa.Table(
    "agent_conversation_messages",
    LARAVEL,
    _uuid_pk(),
    _string("conversation_id", 36),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    _string("agent"),
    _string("role", 25),
    *(
        sa.Column(name, sa.Text(), nullable=False)
        for name in ("content", "attachments", "tool_calls", "tool_results", "usage", "meta")
    ),
    *_timestamps(),
    _index("agent_conversation_messages", "conversation_id"),
    _index("agent_conversation_messages", "user_id"),
    sa.Index("conversation_index", "conversation_id", "user_id", "updated_at"),
)

AUTOPILOTS: Final = sa.Table(
    "autopilots",
    LARAVEL,
    _uuid_pk(),
    sa.Column("owner_user_id", sa.BigInteger(), nullable=False),
    _string("handle", 64),
    _string("display_name", 120),
    _string("avatar", nullable=True),
    _string("status", 16, server_default=sa.text("'active'")),
    _string("visibility", 16, server_default=sa.text("'private'")),
    _string("tagline", nullable=True),
    sa.Column("config_version", sa.Integer(), nullable=False, server_default=sa.text("1")),
    _timestamp("deleted_at"),
    *_timestamps(),
    _unique("autopilots", "handle"),
    _index("autopilots", "owner_user_id"),
    _index("autopilots", "status"),
    _index("autopilots", "owner_user_id", "updated_at"),
    _index("autopilots", "owner_user_id", "visibility", "updated_at"),
)

AUTOPILOT_PROFILES: Final = sa.Table(
    "autopilot_profiles",
    LARAVEL,
    _uuid_pk("autopilot_id"),
    _string("owner_display_name", 120),
    sa.Column("persona_summary", sa.Text(), nullable=True),
    _string("autopilot_voice", 64, nullable=True),
    _json("principles"),
    _json("preferences"),
    _json("onboarding_answers"),
    sa.Column("schema_version", sa.SmallInteger(), nullable=False, server_default=sa.text("1")),
    *_timestamps(),
)

AUTOPILOT_POLICIES: Final = sa.Table(
    "autopilot_policies",
    LARAVEL,
    _uuid_pk("autopilot_id"),
    _string("model_provider", 64, nullable=True),
    _string("model", 128, nullable=True),
    _json("tool_allowlist"),
    _json("tool_denylist"),
    sa.Column(
        "l402_require_approval",
        sa.Boolean(create_constraint=False),
        nullable=False,
        server_default=sa.true(),
        info={_KIND: "boolean"},
    ),
    sa.Column("l402_max_spend_msats_per_call", sa.BigInteger(), nullable=True),
    sa.Column("l402_max_spend_msats_per_day", sa.BigInteger(), nullable=True),
    _json("l402_allowed_hosts"),
    _json("data_policy"),
    *_timestamps(),
)

TABLES: Final[dict[str, sa.Table]] = dict(LARAVEL.tables)


def _columns_of_kind(kind: str) -> dict[str, frozenset[str]]:
    return {
        name: frozenset(c.name for c in table.columns if c.info.get(_KIND) == kind)
        for name, table in TABLES.items()
    }


_JSON_COLUMNS: Final = _columns_of_kind("json")
_TIMESTAMP_COLUMNS: Final = _columns_of_kind("timestamp")
_BOOLEAN_COLUMNS: Final = _columns_of_kind("boolean")
_PRIMARY_KEYS: Final[dict[str, str]] = {
    name: next(iter(table.primary_key.columns)).name for name, table in TABLES.items()
}


def primary_key(table_name: str) -> str:
    """The single primary-key column of a Laravel table (`id` or `autopilot_id`)."""
    return _PRIMARY_KEYS[table_name]


def json_columns(name: str) -> frozenset[str]:
    return _JSON_COLUMNS[name]


def timestamp_columns(name: str) -> frozenset[str]:
    return _TIMESTAMP_COLUMNS[name]


def boolean_columns(name: str) -> frozenset[str]:
    return _BOOLEAN_COLUMNS[name]
