"""The records that coordinate an import run between the stages (stored in `khala_import_runs`).

The publisher announces what it published in a `PublishManifest` (also sent to the manifests
topic); the processor waits until its store holds that many documents per table, derives the
run and records a `DerivationSummary`; `import-chat` and `status` read both back. Their bytes
are made in `codec` only, with a version number, so that a database written by another version
of khala-stream is either read correctly or refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishManifest:
    """What publishing one export as one run did, per source table."""

    run_id: int
    export_sha256: str
    published: dict[str, int] = field(default_factory=dict)
    """Documents sent (or already in the store, for a run published again): the derivation
    waits until the store holds this many of each table."""
    source: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    missing_key: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)
    rejected_lines: list[tuple[str, int, str]] = field(default_factory=list)
    """(ZIP entry, line, reason), the first ones only."""
    tables: list[str] = field(default_factory=list)
    ignored_tables: list[str] = field(default_factory=list)
    order: dict[str, str] = field(default_factory=dict)
    """Per table, the sha256 of the document keys in file order."""
    entries: dict[str, str] = field(default_factory=dict)
    """Per table, the sha256 of its export entry's bytes (`ExportSource.entry_sha256`)."""
    carried: dict[str, int] = field(default_factory=dict)
    """Tables whose entry is the previous run's, byte for byte: nothing of them was read or
    sent, and their documents are the store's of the run named here (`generation`)."""
    patched: dict[str, int] = field(default_factory=dict)
    """Tables a `follow` step amended in place: only the documents that changed were sent,
    stored under the run named here (with tombstones for keys gone), whose other documents
    stay this run's (`generation`)."""

    def generation(self, table: str) -> int:
        """The run whose documents in the store are this run's documents of `table`."""
        return self.carried.get(table) or self.patched.get(table) or self.run_id

    def generations(self) -> dict[str, int]:
        """`generation` of every table whose documents are stored under an earlier run."""
        return self.carried | self.patched


@dataclass(frozen=True, slots=True, kw_only=True)
class DerivationSummary:
    """What deriving one run did: its counters, the rows it emitted and its document
    statistics, with what a later run needs to know whether it may skip its derivation."""

    counters: dict[str, int] = field(default_factory=dict)
    """The reference's counters (SPEC §7), by name."""
    written: dict[str, int] = field(default_factory=dict)
    """Rows emitted per destination table."""
    documents: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per source table: inserted / updated / unchanged / deleted documents."""
    fingerprint: dict[str, Any] | None = None
    """The options the derivation's result depends on (processors/unchanged.py)."""
    skipped: bool = False
    """The derivation was skipped: the export was the last derived run's, unchanged."""
    scoped_threads: int | None = None
    """The derivation derived only this many threads, those the run's changes reach; its
    counters count theirs (processors/scope.py). None: it derived every document."""
