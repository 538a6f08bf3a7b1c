"""The importer's own bookkeeping tables (SPEC §4): all prefixed `khala_import_`, never Laravel's.

JSON-valued columns are TEXT holding compact JSON (`khala_stream.contract.codec.dumps_text`), so
they read back the same on every database.
"""

from __future__ import annotations

from typing import Any, Final

import sqlalchemy as sa

__all__ = [
    "APPLIED",
    "DOCUMENTS",
    "DOCUMENT_LOOKUPS",
    "FOLLOW",
    "IDENTITY",
    "IMPORTER",
    "IMPORTER_TABLES",
    "OFFSETS",
    "REFUSALS",
    "REPLAYED",
    "RETIRED_SOURCE_INDEXES",
    "ROWS",
    "RUNS",
    "SOURCE_DOCUMENTS",
    "SOURCE_LINES",
    "SOURCE_LOOKUPS",
    "USER_IDS",
    "WORKOS_CACHE",
]

IMPORTER: Final = sa.MetaData()

# Integer PK that is a rowid alias on SQLite and SERIAL on PostgreSQL.
_SERIAL: Final[sa.types.TypeEngine[Any]] = sa.Integer()

RUNS: Final = sa.Table(
    "khala_import_runs",
    IMPORTER,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("export_sha256", sa.String(64), nullable=False),
    sa.Column("source", sa.Text(), nullable=False),
    sa.Column("options", sa.Text(), nullable=False),  # JSON
    # 'publishing' | 'published' | 'derived' | 'superseded' | 'failed'
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("expected", sa.Text(), nullable=True),  # codec: the PublishManifest
    sa.Column("counters", sa.Text(), nullable=True),  # codec: the DerivationSummary
    sa.Column("changes_end", sa.Text(), nullable=True),  # JSON: partition -> end offset
    sa.Column("snapshot_ms", sa.BigInteger(), nullable=True),
    sa.Column("claim", sa.String(64), nullable=True),
    sa.Column("claimed_at", sa.DateTime(), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("published_at", sa.DateTime(), nullable=True),
    sa.Column("derived_at", sa.DateTime(), nullable=True),
)

# The ledger of source documents: what each document looked like when last imported.
DOCUMENTS: Final = sa.Table(
    "khala_import_documents",
    IMPORTER,
    sa.Column("source_table", sa.String(16), primary_key=True),
    sa.Column("doc_key", sa.Text(), primary_key=True),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("doc_id", sa.Text(), nullable=True),
    sa.Column("export_seq", sa.Integer(), nullable=False),  # run id that last saw it
    sa.Column("line", sa.Integer(), nullable=False),
    sa.Column("first_seq", sa.Integer(), nullable=False),
    sa.Column("changed_seq", sa.Integer(), nullable=False),
    sa.Column("document", sa.Text(), nullable=False),
    # What a scoped derivation looks documents up by (processors/scope.py). NULL: stored
    # before these columns existed, so not known; '' when the document has none.
    sa.Column("thread_key", sa.Text(), nullable=True),  # its thread (threadId; a thread: key)
    sa.Column("link_key", sa.Text(), nullable=True),  # the run it names; a thread: its owner
    sa.Column("timeless", sa.Boolean(), nullable=True),  # no usable time: rows take the snapshot's
    sa.Column("moved_seq", sa.Integer(), nullable=True),  # run that changed one of the two
    sa.Index(
        "khala_import_documents_source_table_export_seq_line_index",
        "source_table",
        "export_seq",
        "line",
    ),
    sa.Index(
        "khala_import_documents_timeless_index",
        "source_table",
        "export_seq",
        postgresql_where=sa.text("timeless IS NOT FALSE"),
        sqlite_where=sa.text("timeless IS NOT FALSE"),
    ),
)

# The store's indexes that only a later run looks documents up by (what it changed, the
# documents of a thread or naming a run: `processors/scope.py`, `store.table_changes`), by
# name: built once the store holds an earlier run's documents (`db.engine.ensure_lookups`),
# so that a first import does not maintain them row by row; one sorted build costs less.
DOCUMENT_LOOKUPS: Final[dict[str, tuple[str, ...]]] = {
    "khala_import_documents_changed_index": ("source_table", "changed_seq"),
    "khala_import_documents_thread_index": ("source_table", "thread_key"),
    "khala_import_documents_link_index": ("source_table", "link_key"),
}

APPLIED: Final = sa.Table(
    "khala_import_applied",
    IMPORTER,
    sa.Column("run_id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("source_table", sa.String(16), primary_key=True),
    sa.Column("applied", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
)

# The row ledger: the last computed value of each destination row (SPEC §8.7).
ROWS: Final = sa.Table(
    "khala_import_rows",
    IMPORTER,
    sa.Column("dest_table", sa.String(40), primary_key=True),
    sa.Column("row_key", sa.Text(), primary_key=True),
    sa.Column("row_hash", sa.String(64), nullable=True),
    sa.Column("row_id", sa.BigInteger(), nullable=True),
    sa.Column("run_id", sa.Integer(), nullable=True),
)

# Consumer positions, moved in the same transaction as the data they cover.
# This database's id, which the topics it is fed from remember (khala_stream/topic_owner.py).
IDENTITY: Final = sa.Table(
    "khala_import_identity",
    IMPORTER,
    sa.Column("singleton", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("database_id", sa.String(36), nullable=False),
)

OFFSETS: Final = sa.Table(
    "khala_import_offsets",
    IMPORTER,
    sa.Column("consumer_group", sa.Text(), primary_key=True),
    sa.Column("topic", sa.Text(), primary_key=True),
    sa.Column("partition", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger(), nullable=False),
)

USER_IDS: Final = sa.Table(
    "khala_import_user_ids",
    IMPORTER,
    sa.Column("workos_id", sa.Text(), primary_key=True),
    sa.Column("user_id", sa.BigInteger(), nullable=False),
    sa.UniqueConstraint("user_id", name="khala_import_user_ids_user_id_unique"),
)

WORKOS_CACHE: Final = sa.Table(
    "khala_import_workos_cache",
    IMPORTER,
    sa.Column("workos_id", sa.Text(), primary_key=True),
    sa.Column("found", sa.Boolean(create_constraint=False), nullable=False),
    sa.Column("email", sa.Text(), nullable=True),
    sa.Column("name", sa.Text(), nullable=True),
    sa.Column("avatar", sa.Text(), nullable=True),
    sa.Column("fetched_at", sa.DateTime(), nullable=False),
)

REFUSALS: Final = sa.Table(
    "khala_import_refusals",
    IMPORTER,
    sa.Column("id", _SERIAL, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer(), nullable=False),
    sa.Column("dest_table", sa.String(40), nullable=False),
    sa.Column("row_key", sa.Text(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    # The refused value's row hash (an upsert's); NULL for other changes and for refusals
    # recorded before the column existed. The derivation does not offer this value again
    # (`Derivation.refused_again`); `dlq replay` retries it.
    sa.Column("row_hash", sa.String(64), nullable=True),
    sa.Index("khala_import_refusals_dest_table_row_key_index", "dest_table", "row_key"),
)

# Dead letters that `dlq replay` has applied, by their place in the dead-letter topic.
REPLAYED: Final = sa.Table(
    "khala_import_replayed",
    IMPORTER,
    sa.Column("topic", sa.Text(), primary_key=True),
    sa.Column("partition", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("offset", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("replayed_at", sa.DateTime(), nullable=False),
)

# `follow`: where it stands in the deployment it follows (one row; SPEC §5). The positions
# move in the same transaction as the documents they cover in SOURCE_DOCUMENTS.
FOLLOW: Final = sa.Table(
    "khala_import_follow",
    IMPORTER,
    sa.Column("singleton", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("deployment", sa.Text(), nullable=False),
    sa.Column("phase", sa.String(16), nullable=False),  # 'snapshot' | 'deltas'
    sa.Column("snapshot", sa.Text(), nullable=True),  # JSON: the snapshot walked
    sa.Column("table_cursors", sa.Text(), nullable=False),  # JSON: table -> [cursor, done]
    sa.Column("delta_cursor", sa.Text(), nullable=True),  # JSON: where deltas continue
    sa.Column("state_ns", sa.BigInteger(), nullable=False),  # the source time of the state
    sa.Column("version", sa.Integer(), nullable=False),  # moves with every followed change
    sa.Column("published_version", sa.Integer(), nullable=False),
    sa.Column("published_ns", sa.BigInteger(), nullable=False),  # state_ns last published
    sa.Column("published_run", sa.Integer(), nullable=True),
    # The oldest `_ts` of a followed change not published yet, and of the last run published.
    sa.Column("pending_ns", sa.BigInteger(), nullable=True),
    sa.Column("published_pending_ns", sa.BigInteger(), nullable=True),
    # The last end-to-end freshness measured (source `_ts` to the sink's commit), and its run.
    sa.Column("freshness_s", sa.Float(), nullable=True),
    sa.Column("freshness_run", sa.Integer(), nullable=True),
    sa.Column("updated_at", sa.DateTime(), nullable=False),
    # The run whose state SOURCE_LINES describes, which a step may amend in place
    # (producers/live_mirror.py); NULL after a new snapshot.
    sa.Column("lines_run", sa.Integer(), nullable=True),
)

# `follow`: the deployment's documents of the followed tables as last reported (the later
# `_ts` wins; a deletion stays as a tombstone, so an older version cannot come back).
SOURCE_DOCUMENTS: Final = sa.Table(
    "khala_import_source_documents",
    IMPORTER,
    sa.Column("source_table", sa.String(64), primary_key=True),
    sa.Column("doc_id", sa.Text(), primary_key=True),
    sa.Column("ts", sa.BigInteger(), nullable=False),
    sa.Column("creation_time", sa.Float(), nullable=False),
    sa.Column("deleted", sa.Boolean(create_constraint=False), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),  # FOLLOW.version that last changed it
    sa.Column("document", sa.Text(), nullable=False),  # the export line (no _table, _ts)
    sa.Column("doc_key", sa.Text(), nullable=True),  # its key (SPEC §8.2); NULL: none found
)
# An index an earlier version kept on the mirror, in file order; PostgreSQL never read by it
# (file order compares `_id` in byte order, the index in the column's collation), and keeping
# it cost a quarter of the walk's COPY. Dropped at the next snapshot.
RETIRED_SOURCE_INDEXES: Final = ("khala_import_source_documents_order_index",)

# The mirror's indexes that only the steps after a snapshot look documents up by (what
# changed since the state was published, a document by its key: producers/live_mirror.py),
# by name: built once a snapshot is walked (`live_mirror.finish_snapshot`), so that the walk
# does not maintain them row by row; one sorted build costs less.
SOURCE_LOOKUPS: Final[dict[str, tuple[str, ...]]] = {
    "khala_import_source_documents_version_index": ("source_table", "version"),
    "khala_import_source_documents_key_index": ("source_table", "doc_key"),
}

# `follow`: each mirrored document's line and key in the state of FOLLOW.lines_run, which a
# later step may amend (producers/live_mirror.py). A table of its own so that numbering a whole
# state writes narrow rows rather than every document again; a line holds while the document
# keeps the `_creationTime` it was numbered at (its place in file order).
SOURCE_LINES: Final = sa.Table(
    "khala_import_source_lines",
    IMPORTER,
    sa.Column("source_table", sa.String(64), primary_key=True),
    sa.Column("doc_id", sa.Text(), primary_key=True),
    sa.Column("line", sa.Integer(), nullable=False),
    sa.Column("creation_time", sa.Float(), nullable=False),  # when numbered
    sa.Column("published_key", sa.Text(), nullable=True),  # NULL: published without a key
    sa.Index("khala_import_source_lines_line_index", "source_table", "line"),
)

IMPORTER_TABLES: Final[dict[str, sa.Table]] = dict(IMPORTER.tables)
