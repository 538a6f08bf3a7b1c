"""`khala-stream validate`: what an export holds, before anything is published.

The runbook's first step (validate the ZIP, record its sha256) as one streaming pass over the
source tables: size, sha256, documents and rejected lines per table, each rejected line with
its `file:line` and reason. Raises `InvalidExportError` exactly where `open_export` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from khala_stream.contract.documents import has_key
from khala_stream.contract.tables import SOURCE_TABLES
from khala_stream.terminal import printable
from producers.export_reader import (
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_MAX_RATIO,
    DEFAULT_MAX_TOTAL_BYTES,
    RejectedLine,
    open_export,
)

__all__ = ["RejectedRecord", "TableReport", "ValidationReport", "validate_export"]

# Counts stay exact beyond this; only the listing of rejected lines stops growing.
DEFAULT_REJECTED_LIMIT = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class TableReport:
    entry: str
    documents: int
    rejected: int
    missing_key: int = 0
    """Documents without their table's key: set aside by the import, as rejected lines are."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedRecord:
    """Where a rejected line is and why; its raw bytes are not kept."""

    table: str
    entry: str
    line: int
    reason: str

    def location(self) -> str:
        return f"{self.entry}:{self.line}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidationReport:
    path: Path
    kind: Literal["zip", "folder"]
    size_bytes: int
    sha256: str
    snapshot_ms: int | None
    tables: dict[str, TableReport]
    ignored_tables: list[str]
    rejected: list[RejectedRecord]
    rejected_omitted: int = 0

    @property
    def documents(self) -> int:
        return sum(t.documents for t in self.tables.values())

    @property
    def rejected_total(self) -> int:
        return sum(t.rejected for t in self.tables.values())

    @property
    def missing_key_total(self) -> int:
        return sum(t.missing_key for t in self.tables.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "snapshot_ms": self.snapshot_ms,
            "tables": {
                name: {
                    "entry": t.entry,
                    "documents": t.documents,
                    "rejected": t.rejected,
                    "missing_key": t.missing_key,
                }
                for name, t in self.tables.items()
            },
            "ignored_tables": list(self.ignored_tables),
            "documents": self.documents,
            "rejected_total": self.rejected_total,
            "missing_key_total": self.missing_key_total,
            "set_aside": self.rejected_total + self.missing_key_total,
            "rejected": [
                {"table": r.table, "entry": r.entry, "line": r.line, "reason": r.reason}
                for r in self.rejected
            ],
            "rejected_omitted": self.rejected_omitted,
        }

    def lines(self) -> list[str]:
        # Table and entry names come from the export: printed escaped.
        out = [
            f"Export: {printable(str(self.path))} ({self.kind})",
            f"Size: {self.size_bytes} bytes",
            f"sha256: {self.sha256}",
        ]
        width = max((len(name) for name in self.tables), default=0)
        for name, t in self.tables.items():
            out.append(
                f"  {name:<{width}}  {t.documents} documents, {t.rejected} rejected,"
                f" {t.missing_key} without a key"
            )
        missing = [name for name in SOURCE_TABLES if name not in self.tables]
        if missing:
            out.append(f"Missing source tables: {', '.join(missing)}")
        if self.ignored_tables:
            out.append(f"Ignored tables: {', '.join(map(printable, self.ignored_tables))}")
        out.append(f"Documents without a key: {self.missing_key_total}")
        set_aside = self.rejected_total + self.missing_key_total
        out.append(f"Set aside by an import: {set_aside} (in the dead-letter topic)")
        out.append(f"Rejected lines: {self.rejected_total}")
        out.extend(f"{printable(r.location())}: {r.reason}" for r in self.rejected)
        if self.rejected_omitted:
            out.append(f"... and {self.rejected_omitted} more rejected lines")
        return out


def validate_export(
    path: Path | str,
    *,
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    rejected_limit: int = DEFAULT_REJECTED_LIMIT,
) -> ValidationReport:
    """Read every source table once and report; `InvalidExportError` for a bad source."""
    with open_export(
        path,
        max_entry_bytes=max_entry_bytes,
        max_ratio=max_ratio,
        max_total_bytes=max_total_bytes,
    ) as source:
        tables: dict[str, TableReport] = {}
        rejected: list[RejectedRecord] = []
        omitted = 0
        for table in SOURCE_TABLES:
            if not source.has_table(table):
                continue
            documents = bad = keyless = 0
            for item in source.iter_table(table):
                if not isinstance(item, RejectedLine):
                    documents += 1
                    keyless += not has_key(table, item.doc)
                    continue
                bad += 1
                if len(rejected) < rejected_limit:
                    rejected.append(
                        RejectedRecord(
                            table=item.table, entry=item.entry, line=item.line, reason=item.reason
                        )
                    )
                else:
                    omitted += 1
            tables[table] = TableReport(
                entry=source.tables[table], documents=documents, rejected=bad, missing_key=keyless
            )
        return ValidationReport(
            path=source.path,
            kind=source.kind,
            size_bytes=source.size_bytes,
            sha256=source.sha256(),
            snapshot_ms=source.snapshot_ms,
            tables=tables,
            ignored_tables=sorted(t for t in source.tables if t not in SOURCE_TABLES),
            rejected=rejected,
            rejected_omitted=omitted,
        )
