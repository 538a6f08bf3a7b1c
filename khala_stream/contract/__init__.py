"""The event contract shared by the three stages."""

from khala_stream.contract.changes import ChangeOp, RowBatch, RowChange, RowUpsert, SourceRef
from khala_stream.contract.tables import (
    CHAT_TABLES,
    DESTINATION_TABLES,
    DOCUMENT_KEYS,
    REPLACED_TABLES,
    SOURCE_TABLES,
    DestinationTable,
    SourceTable,
    read_tables,
)
from khala_stream.contract.topics import Topics

__all__ = [
    "CHAT_TABLES",
    "DESTINATION_TABLES",
    "DOCUMENT_KEYS",
    "REPLACED_TABLES",
    "SOURCE_TABLES",
    "ChangeOp",
    "DestinationTable",
    "RowBatch",
    "RowChange",
    "RowUpsert",
    "SourceRef",
    "SourceTable",
    "Topics",
    "read_tables",
]
