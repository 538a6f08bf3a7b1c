"""The database side: Laravel's tables, the importer's own tables, engines, offsets, errors."""

from khala_stream.db.engine import create_engine, dialect_name, init_db
from khala_stream.db.errors import is_refusal, is_transient, refusal_reason, sqlstate
from khala_stream.db.importer_tables import (
    APPLIED,
    DOCUMENTS,
    IMPORTER,
    IMPORTER_TABLES,
    OFFSETS,
    REFUSALS,
    ROWS,
    RUNS,
    USER_IDS,
    WORKOS_CACHE,
)
from khala_stream.db.laravel_tables import (
    LARAVEL,
    TABLES,
    boolean_columns,
    json_columns,
    primary_key,
    timestamp_columns,
)
from khala_stream.db.offsets import advance, load_offsets

__all__ = [
    "APPLIED",
    "DOCUMENTS",
    "IMPORTER",
    "IMPORTER_TABLES",
    "LARAVEL",
    "OFFSETS",
    "REFUSALS",
    "ROWS",
    "RUNS",
    "TABLES",
    "USER_IDS",
    "WORKOS_CACHE",
    "advance",
    "boolean_columns",
    "create_engine",
    "dialect_name",
    "init_db",
    "is_refusal",
    "is_transient",
    "json_columns",
    "load_offsets",
    "primary_key",
    "refusal_reason",
    "sqlstate",
    "timestamp_columns",
]
