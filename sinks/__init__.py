"""The idempotent database sink."""

from sinks.sql_sink import ApplyResult, OffsetAdvance, Refusal, SqlSink

__all__ = ["ApplyResult", "OffsetAdvance", "Refusal", "SqlSink"]
