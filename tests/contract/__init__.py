"""Contract tests of the database layer and the sink, against real SQLite and PostgreSQL."""
