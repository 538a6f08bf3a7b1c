"""Source document messages: one per export line, on `<prefix>.<table>`, with provenance headers.

The value is the line's own bytes (never re-encoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from khala_stream.contract.codec import content_hash
from khala_stream.contract.tables import DOCUMENT_KEYS

# PHP's trim() strips exactly these characters; the reference trims string fields with it.
ASCII_TRIM = " \t\n\r\0\x0b"


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    export_sha256: str
    run_id: int
    table: str
    line: int
    doc_id: str | None
    content_hash: str
    generation: int | None = None
    """A `follow` patch (`PublishManifest.patched`): the earlier run whose documents of the
    table this one amends, in place; None: the run's own."""
    deleted: bool = False
    """A `follow` patch's tombstone: the key is gone from the state (the value is empty)."""


def document_headers(p: Provenance) -> list[tuple[str, bytes]]:
    headers = [
        ("khala-export", p.export_sha256.encode()),
        ("khala-run", str(p.run_id).encode()),
        ("khala-table", p.table.encode()),
        ("khala-line", str(p.line).encode()),
        ("khala-id", (p.doc_id or "").encode()),
        ("khala-hash", p.content_hash.encode()),
    ]
    if p.generation is not None:
        headers.append(("khala-generation", str(p.generation).encode()))
    if p.deleted:
        headers.append(("khala-deleted", b"1"))
    return headers


class ProvenanceError(ValueError):
    """Headers that are not a document's provenance; the message says which and why."""


_HASH_CHARS = frozenset("0123456789abcdef")


def read_headers(headers: Sequence[tuple[str, bytes]]) -> Provenance:
    """The provenance of a document message, from its headers; ProvenanceError when one is
    missing or malformed (what the store could not hold: a run or line that is not a 32-bit
    count, a table name that is not a source table, a hash that is not a sha256)."""
    h = dict(headers)
    table, digest = _text(h, "khala-table"), _text(h, "khala-hash")
    if table not in DOCUMENT_KEYS:
        raise ProvenanceError(f"the khala-table header {table[:40]!r} is not a source table")
    if len(digest) != 64 or not _HASH_CHARS.issuperset(digest):
        raise ProvenanceError("the khala-hash header is not a sha256")
    run_id = _count(h, "khala-run", 1)
    generation = _count(h, "khala-generation", 1) if "khala-generation" in h else None
    if generation is not None and generation >= run_id:
        raise ProvenanceError("the khala-generation header names no earlier run")
    deleted = h.get("khala-deleted")
    if deleted not in (None, b"1"):
        raise ProvenanceError("the khala-deleted header is not 1")
    if deleted and generation is None:
        raise ProvenanceError("a khala-deleted record without its khala-generation")
    return Provenance(
        export_sha256=_text(h, "khala-export"),
        run_id=run_id,
        table=table,
        line=_count(h, "khala-line", 0),
        doc_id=(_text(h, "khala-id") if "khala-id" in h else "") or None,
        content_hash=digest,
        generation=generation,
        deleted=deleted is not None,
    )


# Module-level, not closures of `read_headers`: it runs once per document message.
def _text(headers: dict[str, bytes], name: str) -> str:
    value = headers.get(name)
    if value is None:
        raise ProvenanceError(f"no {name} header")
    try:
        decoded = value.decode()
    except UnicodeDecodeError:
        raise ProvenanceError(f"the {name} header is not UTF-8") from None
    if "\0" in decoded:
        raise ProvenanceError(f"the {name} header holds a NUL character")
    return decoded


def _count(headers: dict[str, bytes], name: str, lowest: int) -> int:
    value = headers.get(name)
    # ASCII digits only (bytes.isdigit): no decoding, no NUL, no other script's digits.
    if value is not None and value.isdigit() and lowest <= (number := int(value)) < 2**31:
        return number
    text = _text(headers, name)
    raise ProvenanceError(f"the {name} header {text[:40]!r} is not a number")


def string_field(doc: dict[str, Any], name: str) -> str | None:
    """A string value, trimmed; anything else (numbers, null, empty after trim) is missing."""
    value = doc.get(name)
    if not isinstance(value, str):
        return None
    value = value.strip(ASCII_TRIM)
    return value or None


def document_key(table: str, doc: dict[str, Any], digest: str) -> str | None:
    """The key that identifies a document within its table (SPEC §8.2), or None if it has none.

    A receipt without `_id` is identified by its content (SPEC §8.11).
    """
    key = string_field(doc, DOCUMENT_KEYS[table])  # type: ignore[index]
    if key is None and table == "receipts":
        return f"content:{digest}"
    return key


def has_key(table: str, doc: dict[str, Any]) -> bool:
    """Whether `document_key` finds a key (without hashing the document)."""
    return table == "receipts" or string_field(doc, DOCUMENT_KEYS[table]) is not None  # type: ignore[index]


# A leading space: keys are trimmed (`string_field`), so no real key can be taken for one.
KEYLESS_PREFIX = " keyless:"


def keyless_key(table: str, line: int, digest: str) -> str | None:
    """Where a keyless document still goes to the store, or None when it is only set aside.

    A message without `messageId` writes no row, but seeds its thread's title as the
    reference's title scan does (SPEC §3.15): it is stored under its line and content (two
    equal lines stay two rows, so ties still go to the first in file order), and the store
    never counts or deletes it as a document (`processors.store.keyed`).
    """
    return f"{KEYLESS_PREFIX}{line}:{digest}" if table == "messages" else None


def document_hash(doc: dict[str, Any]) -> str:
    return content_hash(doc)
