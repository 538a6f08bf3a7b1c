"""A `follow` step published as an amendment: only what changed since the state last
published, sent under that state's generation (`PublishManifest.patched`), instead of the
whole state again.

The state published is an export whose documents have fixed lines (`_creationTime`, `_id`
order, SPEC §5). A step can amend it in place when its new documents come after every line
(Khala gives a new document the current time) and its changed ones kept their place: the
lines of everything else stay what they were, so the amended state is, line for line, the
export a full publication would write. For each key a changed document had or has, the
amendment sends the key's winner (its last line, SPEC §8.2) or a tombstone when no document
has that key any more.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Winner:
    """The document a key stands for in the amended state."""

    key: str
    line: int
    doc_id: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Amendment:
    """One followed table's changes since the state last published."""

    documents: list[Winner] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    """Keys no document has any more."""
    new_lines: dict[str, int] = field(default_factory=dict)
    """The lines given to documents new in the state, by `_id`."""
    present_change: int = 0
    """Documents in the table now, less those in the state published."""


def amendment_sha256(base_run: int, amendments: dict[str, Amendment]) -> str:
    """What identifies an amended state: the run amended and every key sent or buried."""
    digest = hashlib.sha256(f"amends {base_run}\n".encode())
    for table in sorted(amendments):
        amendment = amendments[table]
        for winner in amendment.documents:
            digest.update(f"{table} {winner.key} {winner.line}\n".encode())
            digest.update(hashlib.sha256(winner.raw).digest())
        for key in amendment.gone:
            digest.update(f"{table} {key} gone\n".encode())
    return digest.hexdigest()
