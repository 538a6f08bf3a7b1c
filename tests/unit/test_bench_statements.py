"""The bench's grouping of PostgreSQL statements: one line per verb and table."""

from __future__ import annotations

import pytest

from bench.statements import grouped, statement_label


@pytest.mark.parametrize(
    ("query", "label"),
    [
        ('COPY "messages"("id", "thread_id") FROM STDIN (FORMAT binary)', "COPY messages"),
        (
            'COPY "khala_stage_run_events_ecc134c0fccd"("thread_id") FROM STDIN (FORMAT binary)',
            "COPY khala_stage_run_events",
        ),
        (
            "INSERT INTO khala_import_documents (source_table, doc_key) SELECT * FROM s"
            " ON CONFLICT (source_table, doc_key) DO UPDATE SET line = excluded.line",
            "INSERT khala_import_documents",
        ),
        (
            "WITH r AS MATERIALIZED (SELECT nextval($1) AS id, s.* FROM khala_stage_x_0123abcd"
            " AS s) INSERT INTO run_events (id) SELECT id FROM r",
            "INSERT run_events",
        ),
        ("UPDATE khala_import_runs SET status = $1 WHERE id = $2", "UPDATE khala_import_runs"),
        ("DELETE FROM khala_import_offsets WHERE topic = $1", "DELETE khala_import_offsets"),
        (
            "SELECT khala_import_documents.doc_key, khala_import_documents.line\n"
            "FROM khala_import_documents WHERE source_table = $1",
            "SELECT khala_import_documents",
        ),
        ("ANALYZE khala_import_rows (dest_table, row_key), messages", "ANALYZE khala_import_rows"),
        ("select pg_advisory_xact_lock($1)", "SELECT"),
        ("BEGIN", "BEGIN"),
    ],
)
def test_a_statement_is_labelled_by_its_verb_and_table(query: str, label: str) -> None:
    assert statement_label(query) == label


def test_statements_of_one_label_add_up_longest_first() -> None:
    rows = [
        ('COPY "messages"("id") FROM STDIN', 3, 3000, 1500.0),
        ('COPY "khala_import_rows"("row_key") FROM STDIN', 2, 5000, 2600.0),
        ('COPY "messages"("id", "content") FROM STDIN', 1, 1000, 1000.0),
    ]
    result = grouped(rows)
    assert [(s.label, s.seconds, s.calls, s.rows) for s in result] == [
        ("COPY khala_import_rows", 2.6, 2, 5000),
        ("COPY messages", 2.5, 4, 4000),
    ]
