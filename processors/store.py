"""The processors' state: the latest version of every source document, by export.

Documents land here from the source topics (in the same transaction as the consumer offsets),
and the derivation reads one export's documents back in file order. The same table is the
ledger that incremental publishing compares content hashes against (SPEC §5).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream.contract.documents import KEYLESS_PREFIX
from khala_stream.db.importer_tables import APPLIED, DOCUMENTS
from khala_stream.db.queries import copy_new_rows, insert_for, one_of, staged

_PAGE = 2000
_PAGE_TEXT = 512 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class IncomingDocument:
    """One message of a source topic: a document with its provenance."""

    run_id: int
    table: str
    key: str
    line: int
    content_hash: str
    doc_id: str | None
    raw: bytes
    thread_key: str | None = None
    """Its thread, '' for none (`linkage.document_refs`); None: not known, which keeps every
    derivation of the store full (processors/scope.py)."""
    link_key: str | None = None
    timeless: bool | None = None
    generation: int | None = None
    """A `follow` patch's: the earlier run whose documents this one amends (`Provenance`)."""
    deleted: bool = False
    """A patch's tombstone: the key left the state of run `generation` in this run."""

    @property
    def export_seq(self) -> int:
        return self.run_id if self.generation is None else self.generation


@dataclass(frozen=True, slots=True)
class StoredDocument:
    key: str
    line: int
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TableChanges:
    """Incremental statistics of one source table for one run (SPEC §5)."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0


_COLUMNS: tuple[str, ...] = (
    "source_table",
    "doc_key",
    "content_hash",
    "doc_id",
    "export_seq",
    "line",
    "first_seq",
    "changed_seq",
    "document",
    "thread_key",
    "link_key",
    "timeless",
)


def _latest(documents: Iterable[IncomingDocument]) -> list[IncomingDocument]:
    """Per key the newest version: a later export wins, then a later line (SPEC §8.2).

    Sorted by (table, key): every writer of the store (this upsert and the publisher's marking
    in `producers/ledger.py`) locks its rows in that one order, so they cannot deadlock.
    """
    best: dict[tuple[str, str], IncomingDocument] = {}
    for d in documents:
        current = best.get((d.table, d.key))
        if current is None or (d.run_id, d.line) > (current.run_id, current.line):
            best[(d.table, d.key)] = d
    return [best[k] for k in sorted(best)]


def _upsert(insert: Any) -> Any:
    """The store's conflict rule: a newer export, or a later line of the same one, replaces
    what is stored; `changed_seq` moves only when the content did.

    A `follow` patch (`export_seq` an earlier run's, `changed_seq` its own run) amends its
    generation in place: it replaces the stored version of that generation whatever its line
    (the patch names the key's winner), and a document back in the state after it left counts
    as changed and moved (a scoped derivation cannot know what it was)."""
    old, new = DOCUMENTS.c, insert.excluded
    patch = new.changed_seq > new.export_seq
    back = sa.and_(patch, old.export_seq < new.export_seq)
    return insert.on_conflict_do_update(
        index_elements=[old.source_table, old.doc_key],
        set_={
            "export_seq": new.export_seq,
            "line": new.line,
            "doc_id": new.doc_id,
            "content_hash": new.content_hash,
            "document": new.document,
            "thread_key": new.thread_key,
            "link_key": new.link_key,
            "timeless": new.timeless,
            # A scoped derivation cannot see the thread or run a document left (the store
            # keeps only the latest version): it derives in full when one moved.
            "moved_seq": sa.case(
                (
                    sa.or_(
                        old.thread_key.is_distinct_from(new.thread_key),
                        old.link_key.is_distinct_from(new.link_key),
                        back,
                    ),
                    new.changed_seq,
                ),
                else_=old.moved_seq,
            ),
            "changed_seq": sa.case(
                (sa.or_(old.content_hash != new.content_hash, back), new.changed_seq),
                else_=old.changed_seq,
            ),
        },
        where=sa.or_(
            new.export_seq > old.export_seq,
            sa.and_(new.export_seq == old.export_seq, sa.not_(patch), new.line > old.line),
            sa.and_(new.export_seq == old.export_seq, patch, new.changed_seq >= old.changed_seq),
        ),
    )


async def apply_documents(
    conn: AsyncConnection, documents: Sequence[IncomingDocument], *, fresh: bool = False
) -> None:
    """Upsert a batch into the store and count it as applied, inside the caller's transaction.

    `fresh`: the store held none of these tables' documents before this run (a first import),
    so the batch is most likely all new keys and is COPied straight into the store; a key it
    already holds (a document twice in the export) makes it take the upsert instead.
    """
    if not documents:
        return
    newest = _latest(documents)
    await _bury(conn, [d for d in newest if d.deleted])
    latest = [d for d in newest if not d.deleted]
    if not latest:
        pass  # tombstones only
    elif conn.dialect.name == "postgresql":
        if not (fresh and await copy_new_rows(conn, DOCUMENTS.name, _COLUMNS, _rows(latest))):
            # COPY and one INSERT … SELECT: a VALUES statement of a few thousand rows costs
            # more to build and to parse than to execute.
            async with staged(conn, DOCUMENTS.name, _COLUMNS, _rows(latest)) as name:
                stage = sa.table(name, *(sa.column(c) for c in _COLUMNS))
                ordered = sa.select(stage).order_by(stage.c.source_table, stage.c.doc_key)
                insert = postgresql.insert(DOCUMENTS).from_select(list(_COLUMNS), ordered)
                await conn.execute(_upsert(insert))
    else:
        await conn.execute(
            _upsert(sqlite.insert(DOCUMENTS)),
            [dict(zip(_COLUMNS, r, strict=True)) for r in _rows(latest)],
        )
    await _count_applied(conn, documents)


def _rows(documents: list[IncomingDocument]) -> Iterator[tuple[Any, ...]]:
    # A generator: each document's text is decoded as COPY sends it, not all at once.
    return (
        (d.table, d.key, d.content_hash, d.doc_id, d.export_seq, d.line, d.run_id, d.run_id,
         d.raw.decode(), d.thread_key, d.link_key, d.timeless)
        for d in documents
    )  # fmt: skip


async def _bury(conn: AsyncConnection, tombstones: list[IncomingDocument]) -> None:
    """A patch's tombstones: each key leaves its generation's documents (stored under the run
    before it, so it counts as vanished) and counts as changed in the patch's run. One key at
    a time, in key order (`_latest`), the store's one lock order."""
    c = DOCUMENTS.c
    for d in tombstones:
        await conn.execute(
            sa.update(DOCUMENTS)
            .where(
                c.source_table == d.table,
                c.doc_key == d.key,
                c.export_seq == d.export_seq,
                c.changed_seq <= d.run_id,
            )
            .values(export_seq=d.export_seq - 1, changed_seq=d.run_id)
        )


async def _count_applied(conn: AsyncConnection, documents: Sequence[IncomingDocument]) -> None:
    counts: dict[tuple[int, str], int] = {}
    for d in documents:
        counts[(d.run_id, d.table)] = counts.get((d.run_id, d.table), 0) + 1
    insert = insert_for(conn, APPLIED)
    insert = insert.on_conflict_do_update(
        index_elements=[APPLIED.c.run_id, APPLIED.c.source_table],
        set_={"applied": APPLIED.c.applied + insert.excluded.applied},
    )
    await conn.execute(
        insert,
        [{"run_id": r, "source_table": t, "applied": n} for (r, t), n in counts.items()],
    )


async def applied_counts(conn: AsyncConnection, run_id: int) -> dict[str, int]:
    result = await conn.execute(
        sa.select(APPLIED.c.source_table, APPLIED.c.applied).where(APPLIED.c.run_id == run_id)
    )
    return {table: int(n) for table, n in result.all()}


async def iter_pages(
    engine: AsyncEngine, table: str, generation: int
) -> AsyncIterator[list[StoredDocument]]:
    """One export's documents of a table in file order, a page at a time (memory stays flat:
    a page holds at most 2,000 documents and about 512 KB of their text). `generation`: the
    run the documents are stored under (`PublishManifest.generation`)."""
    c = DOCUMENTS.c
    last_line = -1
    while True:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(c.doc_key, c.line, c.document)
                    .where(c.source_table == table, c.export_seq == generation, c.line > last_line)
                    .order_by(c.line)
                    .limit(_PAGE)
                )
            ).all()
        for part in _by_text_size(rows):
            documents = [
                StoredDocument(key, line, orjson.loads(doc)) for key, line, doc in part if doc
            ]
            if documents:
                yield documents
        if len(rows) < _PAGE:
            return
        last_line = rows[-1][1]


def _by_text_size(rows: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """`rows` (key, line, document text) in slices of about `_PAGE_TEXT` characters: parsed,
    a document takes several times its text, and blueprints run to kilobytes each."""
    start, size = 0, 0
    for i, (_, _, doc) in enumerate(rows):
        size += len(doc)
        if size >= _PAGE_TEXT:
            yield rows[start : i + 1]
            start, size = i + 1, 0
    if start < len(rows):
        yield rows[start:]


async def documents_by_key(
    engine: AsyncEngine, table: str, keys: Sequence[str]
) -> list[StoredDocument]:
    """The stored documents of `table` with these keys (the latest version of each)."""
    c = DOCUMENTS.c
    found: list[StoredDocument] = []
    async with engine.connect() as conn:
        for start in range(0, len(keys), _PAGE):
            chunk = keys[start : start + _PAGE]
            rows = await conn.execute(
                sa.select(c.doc_key, c.line, c.document).where(
                    c.source_table == table, one_of(c.doc_key, chunk, conn.dialect.name)
                )
            )
            found += [StoredDocument(k, line, orjson.loads(doc)) for k, line, doc in rows.all()]
    return found


@dataclass(frozen=True, slots=True)
class Before:
    """The run derived just before the one whose statistics are taken: the generation of
    each table it read and its statistics."""

    generations: Mapping[str, int]
    documents: Mapping[str, TableChanges]


async def table_changes(
    conn: AsyncConnection,
    run_id: int,
    tables: Iterable[str],
    carried: Mapping[str, int],
    before: Before | None = None,
) -> dict[str, TableChanges]:
    """Inserted / updated / unchanged documents of this run and documents that vanished
    (keyless ones are no documents here: they were set aside). `carried`: the tables whose
    documents are stored under an earlier run (`PublishManifest.generations`). With `before`
    (the run just before, derived), a table of the same generation there is counted from its
    statistics and the documents this run changed, by index, not over its whole generation."""
    c = DOCUMENTS.c
    found: dict[str, TableChanges] = {}
    for table in tables:
        generation = carried.get(table, run_id)
        of_table = sa.and_(c.source_table == table, keyed(c.doc_key))
        gone = int(
            await conn.scalar(sa.select(sa.func.count()).where(of_table, c.export_seq < generation))
            or 0
        )
        known = None
        if before is not None and table in carried and before.generations.get(table) == generation:
            known = before.documents.get(table)
        in_generation = c.export_seq == generation
        if known is not None:
            # Only this run's changes are new since `before` counted the table.
            inserted, updated, new = await _count(
                conn,
                sa.and_(of_table, c.changed_seq == run_id),
                sa.and_(c.first_seq == run_id, in_generation),
                sa.and_(c.first_seq < run_id, in_generation),
                c.first_seq == run_id,
            )
            stored = known.inserted + known.updated + known.unchanged + known.deleted + new
            same = stored - gone - inserted - updated
        else:
            inserted, updated, same = await _count(
                conn,
                sa.and_(of_table, in_generation),
                c.first_seq == run_id,
                sa.and_(c.changed_seq == run_id, c.first_seq < run_id),
                c.changed_seq < run_id,
            )
        found[table] = TableChanges(inserted, updated, same, gone)
    return found


async def _count(conn: AsyncConnection, where: Any, *conditions: Any) -> list[int]:
    """How many documents matching `where` meet each of `conditions`, in one pass."""
    sums = [sa.func.sum(sa.case((condition, 1), else_=0)) for condition in conditions]
    row = (await conn.execute(sa.select(*sums).where(where))).one()
    return [int(n or 0) for n in row]


async def vanished_keys(conn: AsyncConnection, table: str, generation: int) -> list[str]:
    """Keys of `table` no export since run `generation` listed (the store holds them from an
    earlier run)."""
    result = await conn.execute(
        sa.select(DOCUMENTS.c.doc_key).where(
            DOCUMENTS.c.source_table == table,
            DOCUMENTS.c.export_seq < generation,
            keyed(DOCUMENTS.c.doc_key),
        )
    )
    return [k for (k,) in result.all()]


def keyed(doc_key: Any) -> Any:
    """Documents with their own key: a keyless one is in the store only to be read by the
    derivation (a message's title seed), never counted as a document nor deleted as one."""
    return sa.not_(doc_key.startswith(KEYLESS_PREFIX, autoescape=True))


async def forget(conn: AsyncConnection, table: str, keys: Sequence[str]) -> None:
    for start in range(0, len(keys), 500):
        await conn.execute(
            sa.delete(DOCUMENTS).where(
                DOCUMENTS.c.source_table == table,
                DOCUMENTS.c.doc_key.in_(keys[start : start + 500]),
            )
        )


# -- what a scoped derivation reads (processors/scope.py): by index, never the whole store ---


@dataclass(frozen=True, slots=True)
class Touched:
    """A document this run changed, inserted or saw vanish, with what it refers to."""

    key: str
    thread_key: str | None
    link_key: str | None
    inserted: bool
    moved: bool
    present: bool
    """In this run (False: it vanished)."""


async def changed_documents(
    conn: AsyncConnection, table: str, run_id: int, generation: int
) -> list[Touched]:
    """The documents of `table` this run inserted or changed (none when the table is carried:
    nothing of it was sent)."""
    c = DOCUMENTS.c
    rows = await conn.execute(
        sa.select(c.doc_key, c.thread_key, c.link_key, c.first_seq, c.moved_seq).where(
            c.source_table == table, c.changed_seq == run_id, c.export_seq == generation
        )
    )
    return [
        Touched(k, t, r, first == run_id, moved == run_id, True) for k, t, r, first, moved in rows
    ]


async def newly_vanished(
    conn: AsyncConnection, table: str, run_id: int, generation: int, previous_generation: int
) -> list[Touched]:
    """The documents of `table` the previous run had (`previous_generation`) and this one has
    not: all of that generation's when this run's is another, else those a patch's
    tombstones took out of it in this run."""
    c = DOCUMENTS.c
    if generation == previous_generation:
        gone = sa.and_(c.changed_seq == run_id, c.export_seq < generation)
    else:
        gone = c.export_seq == previous_generation
    rows = await conn.execute(
        sa.select(c.doc_key, c.thread_key, c.link_key).where(c.source_table == table, gone)
    )
    return [Touched(k, t, r, False, False, False) for k, t, r in rows]


async def any_unreferenced(conn: AsyncConnection, tables: Sequence[str]) -> bool:
    """Whether a document of `tables` was stored before the store kept its references."""
    c = DOCUMENTS.c
    found = await conn.scalar(
        sa.select(sa.literal(1)).where(c.source_table.in_(tables), c.thread_key.is_(None)).limit(1)
    )
    return found is not None


async def referring(
    conn: AsyncConnection,
    table: str,
    column: str,
    values: Iterable[str],
    generation: int,
    wanted: str = "thread_key",
) -> set[str]:
    """The `wanted` references of `table`'s documents of `generation` whose `column`
    ("thread_key", "link_key" or "doc_key") is one of `values`."""
    c = DOCUMENTS.c
    values = sorted(set(values) - {""})
    found: set[str] = set()
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        rows = await conn.execute(
            sa.select(c[wanted]).where(
                c.source_table == table, c[column].in_(chunk), c.export_seq == generation
            )
        )
        found.update(v for (v,) in rows if v)
    return found


async def timeless_threads(conn: AsyncConnection, table: str, generation: int) -> set[str]:
    """The threads of `table`'s documents (of `generation`) whose rows take the snapshot's
    time (`linkage.document_refs`)."""
    c = DOCUMENTS.c
    rows = await conn.execute(
        sa.select(c.thread_key).where(
            c.source_table == table, c.export_seq == generation, c.timeless.is_not(False)
        )
    )
    return {t for (t,) in rows if t}


async def documents_of_threads(
    engine: AsyncEngine, table: str, thread_keys: Sequence[str], generation: int
) -> AsyncIterator[list[StoredDocument]]:
    """`table`'s documents (of `generation`) of these threads, a few hundred threads at a
    time, each thread's documents in file order in one page."""
    c = DOCUMENTS.c
    keys = sorted(set(thread_keys))
    for start in range(0, len(keys), 500):
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(c.doc_key, c.line, c.document)
                .where(
                    c.source_table == table,
                    c.thread_key.in_(keys[start : start + 500]),
                    c.export_seq == generation,
                )
                .order_by(c.line)
            )
            documents = [StoredDocument(k, line, orjson.loads(doc)) for k, line, doc in rows]
        if documents:
            yield documents


async def lingering(conn: AsyncConnection, table: str, previous_generation: int) -> bool:
    """Whether `table` holds a document that was gone before the run `previous_generation`
    (vanished, and kept: without --propagate-deletes, or withheld). Keyless documents are
    not counted: one is kept whenever the lines before it shift (its key is its line and
    content), and it comes back only with the document it was, at its line."""
    c = DOCUMENTS.c
    found = await conn.scalar(
        sa.select(sa.literal(1))
        .where(c.source_table == table, c.export_seq < previous_generation, keyed(c.doc_key))
        .limit(1)
    )
    return found is not None


async def established_owners(
    conn: AsyncConnection, owners: Iterable[str], generation: int, run_id: int
) -> set[str]:
    """Those of `owners` who own a thread (of `generation`) stored before run `run_id`."""
    c = DOCUMENTS.c
    wanted = sorted(set(owners) - {""})
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        rows = await conn.execute(
            sa.select(c.link_key)
            .distinct()
            .where(
                c.source_table == "threads",
                c.link_key.in_(wanted[start : start + 500]),
                c.export_seq == generation,
                c.first_seq < run_id,
            )
        )
        found.update(o for (o,) in rows)
    return found


async def documents_where(
    engine: AsyncEngine, table: str, column: str, values: Sequence[str], generation: int
) -> list[StoredDocument]:
    """`table`'s documents of `generation` whose `column` ("doc_key", "thread_key" or
    "link_key") is one of `values`."""
    c = DOCUMENTS.c
    found: list[StoredDocument] = []
    async with engine.connect() as conn:
        for start in range(0, len(values), 500):
            rows = await conn.execute(
                sa.select(c.doc_key, c.line, c.document).where(
                    c.source_table == table,
                    c[column].in_(values[start : start + 500]),
                    c.export_seq == generation,
                )
            )
            found += [StoredDocument(k, line, orjson.loads(doc)) for k, line, doc in rows]
    return found
