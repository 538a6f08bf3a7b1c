"""Source-topic records the processor can store, and the ones it must set aside.

A record that cannot be read (provenance headers missing or malformed, a key or value that is
not what the publisher sends) would fail its batch on every delivery: the stage would exit,
restart at the same offset and exit again. It becomes a dead letter instead, and the stage's
position moves past it with the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from aiokafka import ConsumerRecord

from khala_stream.contract import Topics
from khala_stream.contract.dead_letters import DeadLetter
from khala_stream.contract.documents import ProvenanceError, read_headers
from khala_stream.dead_letters import record_letter
from khala_stream.runtime import Batch
from processors.linkage import document_refs
from processors.store import IncomingDocument


class _Unreadable(Exception):
    """Why a record is not a document; the message is the dead letter's reason."""


@dataclass(slots=True)
class ScreenedDocuments:
    documents: list[IncomingDocument] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)


def screen_documents(batch: Batch, topics: Topics) -> ScreenedDocuments:
    """The batch's records as documents to store, and dead letters for those that are not."""
    screened = ScreenedDocuments()
    for records in batch.values():
        for r in records:
            try:
                screened.documents.append(_document(r, topics))
            except _Unreadable as exc:
                table = r.topic.removeprefix(topics.prefix + ".")
                letter = record_letter("process", r, "undecodable_record", str(exc), table=table)
                screened.letters.append(letter)
    return screened


def _document(r: ConsumerRecord[bytes, bytes], topics: Topics) -> IncomingDocument:
    try:
        provenance = read_headers(r.headers)
    except ProvenanceError as exc:
        raise _Unreadable(str(exc)) from None
    if topics.source(provenance.table) != r.topic:
        raise _Unreadable(f"a {provenance.table} document on {r.topic}")
    try:
        key = (r.key or b"").decode()
    except UnicodeDecodeError:
        raise _Unreadable("the key is not UTF-8") from None
    if not key or "\0" in key:
        raise _Unreadable("the key is empty or holds a NUL character")
    if r.value is None:
        raise _Unreadable("the record has no value")
    if provenance.deleted:  # an amendment's tombstone: nothing to parse, nothing it refers to
        if r.value:
            raise _Unreadable("a tombstone with a value")
        thread_key = link_key = None
        timeless = None
    else:
        # The derivation parses the stored text again: what it could not parse stops here.
        try:
            document = orjson.loads(r.value)
        except orjson.JSONDecodeError as exc:
            raise _Unreadable(f"the value is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise _Unreadable("the value is not a JSON object")
        thread_key, link_key, timeless = document_refs(provenance.table, key, document)
    return IncomingDocument(
        run_id=provenance.run_id,
        table=provenance.table,
        key=key,
        line=provenance.line,
        content_hash=provenance.content_hash,
        doc_id=provenance.doc_id,
        raw=r.value,
        thread_key=thread_key,
        link_key=link_key,
        timeless=timeless,
        generation=provenance.generation,
        deleted=provenance.deleted,
    )
