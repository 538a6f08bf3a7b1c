"""What `follow` knows of a live deployment: its followed tables' documents as last reported
(`khala_import_source_documents`) and where it stands in the deployment
(`khala_import_follow`), kept together so that a position never runs ahead of the documents
it covers: every page of the source is applied, with the position after it, in one
transaction. A crash (kill -9) anywhere resumes from the last page applied.

The state is published as an export would list it (`write_folder`): one
`<table>/documents.jsonl` per followed table, documents ordered by `_creationTime` then `_id`
(SPEC §5), deleted ones left out, the folder's time the source time of the state. The
publisher then treats it as a newer export of the same deployment (a merge import, SPEC §5),
so the end state after each step equals a merge import of an export taken at that point.

Versions: a version of a document replaces the stored one only when its `_ts` is newer (a
version can arrive twice: in the snapshot and as a delta, with one `_ts`); a deletion is a
tombstone with its `_ts`, so a late older version cannot bring the document back.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream.contract.documents import string_field
from khala_stream.contract.tables import DOCUMENT_KEYS
from khala_stream.db.engine import create_lookups, drop_lookups, indexes_built_after
from khala_stream.db.importer_tables import (
    FOLLOW,
    RETIRED_SOURCE_INDEXES,
    RUNS,
    SOURCE_DOCUMENTS,
    SOURCE_LINES,
    SOURCE_LOOKUPS,
)
from khala_stream.db.queries import copy_new_rows, copy_out_lines, insert_for, staged
from khala_stream.errors import UsageError
from khala_stream.import_runs import FOLLOW_SOURCE
from producers.amendment import Amendment, Winner
from producers.export_reader import MAX_LINE_BYTES, TABLE_FILE, parse_document
from producers.live_api import Cursor, LiveValue
from producers.table_spool import TableSpool

RUN_SOURCE = FOLLOW_SOURCE
"""How a run `follow` published names its source: `follow <deployment> cursor=<cursor>`."""
_PAGE = 2000
# A table's documents in file order (SPEC §5: `_creationTime`, then `_id` byte by byte).
_FOLDER_SQL: Final = (
    f"SELECT document FROM {SOURCE_DOCUMENTS.name} WHERE source_table = $1 AND NOT deleted"
    ' ORDER BY creation_time, doc_id COLLATE "C"'
)
# A page's rows as `_apply` writes them into SOURCE_DOCUMENTS.
_MIRROR_COLUMNS: Final = (
    "source_table", "doc_id", "ts", "creation_time", "deleted", "version", "document", "doc_key"
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowState:
    """One row of `khala_import_follow`."""

    deployment: str
    phase: str
    """'snapshot' while the snapshot is walked, then 'deltas'."""
    snapshot: Cursor | None
    table_cursors: dict[str, tuple[Cursor | None, bool]]
    """Per table of the snapshot walk: the page cursor to go on from, and whether it is done."""
    delta_cursor: Cursor | None
    state_ns: int
    """The source time of the state: the newest `_ts` or position the source reported."""
    version: int
    published_version: int
    published_ns: int
    published_run: int | None
    pending_ns: int | None
    """The oldest `_ts` of a followed change not yet published."""
    published_pending_ns: int | None
    """The oldest `_ts` of a change first published in run `published_run`."""
    freshness_s: float | None
    freshness_run: int | None
    updated_at: datetime
    lines_run: int | None = None
    """The run whose state a step may amend in place (`plan_amendment`); None after a new
    snapshot, before it is published whole."""

    @property
    def unpublished(self) -> bool:
        return self.version > self.published_version

    @property
    def snapshot_ns(self) -> int:
        """The snapshot's source time; 0 when its position says nothing about time."""
        return _as_ns(self.snapshot)


@dataclass(slots=True)
class PageEffect:
    """What one page did to the mirror, per table."""

    changed: Counter[str] = field(default_factory=Counter)
    deleted: Counter[str] = field(default_factory=Counter)
    ignored: int = 0
    """Values of tables not followed, or not newer than what the mirror holds."""
    copied: list[tuple[float, str, str]] | None = None
    """A walked page COPied in as new documents: each one's `_creationTime` sort position,
    `_id` and text (`table_spool.TableSpool.add`). None when it was upserted."""


def _now() -> datetime:
    return datetime.now(tz=UTC).replace(tzinfo=None, microsecond=0)


def _dump(value: object) -> str:
    return orjson.dumps(value).decode()


def _from_row(row: Any) -> FollowState:
    cursors = orjson.loads(row.table_cursors)
    return FollowState(
        deployment=row.deployment,
        phase=row.phase,
        snapshot=orjson.loads(row.snapshot) if row.snapshot else None,
        table_cursors={t: (c, bool(done)) for t, (c, done) in cursors.items()},
        delta_cursor=orjson.loads(row.delta_cursor) if row.delta_cursor else None,
        state_ns=int(row.state_ns),
        version=int(row.version),
        published_version=int(row.published_version),
        published_ns=int(row.published_ns),
        published_run=row.published_run,
        pending_ns=row.pending_ns,
        published_pending_ns=row.published_pending_ns,
        freshness_s=row.freshness_s,
        freshness_run=row.freshness_run,
        updated_at=row.updated_at,
        lines_run=row.lines_run,
    )


async def load_state(engine: AsyncEngine, deployment: str) -> FollowState | None:
    """Where this database stands in `deployment`; None before the first snapshot.

    UsageError (exit 2) when the database follows another deployment: its documents would
    mix with this one's."""
    async with engine.connect() as conn:
        return await _load(conn, deployment)


async def _load(conn: AsyncConnection, deployment: str) -> FollowState | None:
    row = (await conn.execute(sa.select(FOLLOW).where(FOLLOW.c.singleton == 1))).first()
    if row is None:
        return None
    if row.deployment != deployment:
        raise UsageError(
            f"this database follows {row.deployment}, not {deployment}: one deployment per"
            " database"
        )
    return _from_row(row)


def run_source(deployment: str, cursor: Cursor | None) -> str:
    return f"{RUN_SOURCE}{deployment} cursor={cursor}"


async def newest_export_ms(engine: AsyncEngine) -> int:
    """The newest snapshot time (ms) of an export imported into this database (not one
    `follow` published); 0 when none."""
    async with engine.connect() as conn:
        found = await conn.scalar(
            sa.select(sa.func.max(RUNS.c.snapshot_ms)).where(
                sa.not_(RUNS.c.source.startswith(RUN_SOURCE, autoescape=True)),
                RUNS.c.status.in_(("published", "derived")),
            )
        )
    return int(found or 0)


async def start_snapshot(engine: AsyncEngine, deployment: str, snapshot: Cursor) -> FollowState:
    """Begin the snapshot walk at `snapshot`: the first time, again after the source stopped
    serving an unfinished one, or after it stopped keeping the changes after the delta cursor.
    What the mirror held is dropped (the new snapshot is the whole state: a document it lacks
    is gone); what was published stays recorded, so the walked state is published as the next
    version."""
    async with engine.begin() as conn:
        old = await _load(conn, deployment)
        await conn.execute(sa.delete(SOURCE_DOCUMENTS))
        await conn.execute(sa.delete(SOURCE_LINES))
        await drop_lookups(conn, SOURCE_LOOKUPS)  # built again once the walk is done
        await drop_lookups(conn, RETIRED_SOURCE_INDEXES)
        values = {
            "deployment": deployment,
            "phase": "snapshot",
            "snapshot": _dump(snapshot),
            "table_cursors": "{}",
            "delta_cursor": None,
            "state_ns": _as_ns(snapshot),
            "pending_ns": None,
            "lines_run": None,  # the new snapshot's documents have no lines yet
            "updated_at": _now(),
        }
        if old is None:
            first = {
                "version": 0,
                "published_version": 0,
                "published_ns": 0,
                "published_run": None,
                "published_pending_ns": None,
                "freshness_s": None,
                "freshness_run": None,
            }
            await conn.execute(sa.insert(FOLLOW).values(singleton=1, **values, **first))
        else:
            await conn.execute(sa.update(FOLLOW).where(FOLLOW.c.singleton == 1).values(**values))
        state = await _load(conn, deployment)
    assert state is not None
    return state


async def apply_snapshot_page(
    engine: AsyncEngine,
    deployment: str,
    table: str,
    values: Sequence[LiveValue],
    cursor: Cursor | None,
    done: bool,
) -> list[tuple[float, str, str]] | None:
    """A page of `table`'s snapshot walk, and the cursor after it, in one transaction. What
    it COPied in as new documents (`PageEffect.copied`), None when it upserted them."""
    async with engine.begin() as conn:
        state = await _locked(conn, deployment)
        page = [v for v in values if v.table == table]
        effect = await _apply(conn, page, {table}, state.version, walked=True)
        cursors = {t: [c, d] for t, (c, d) in state.table_cursors.items()}
        cursors[table] = [cursor, done]
        newest = max([state.state_ns, *(v.ts for v in values)])
        await conn.execute(
            sa.update(FOLLOW)
            .where(FOLLOW.c.singleton == 1)
            .values(table_cursors=_dump(cursors), state_ns=newest, updated_at=_now())
        )
    return effect.copied


async def finish_snapshot(engine: AsyncEngine, deployment: str) -> FollowState:
    """Every table walked: deltas follow from the snapshot; the state is to be published."""
    async with engine.begin() as conn:
        state = await _locked(conn, deployment)
        await create_lookups(conn, SOURCE_DOCUMENTS.name, SOURCE_LOOKUPS)
        await conn.execute(
            sa.update(FOLLOW)
            .where(FOLLOW.c.singleton == 1)
            .values(
                phase="deltas",
                delta_cursor=_dump(state.snapshot),
                version=state.version + 1,
                updated_at=_now(),
            )
        )
        after = await _load(conn, deployment)
    assert after is not None
    return after


async def apply_delta_page(
    engine: AsyncEngine,
    deployment: str,
    values: Sequence[LiveValue],
    cursor: Cursor,
    followed: Iterable[str],
) -> tuple[FollowState, PageEffect]:
    """A page of deltas and the cursor after it, in one transaction; the version moves when
    a followed document changed."""
    async with engine.begin() as conn:
        state = await _locked(conn, deployment)
        version = state.version + 1
        effect = await _apply(conn, values, set(followed), version)
        newest = max([state.state_ns, _as_ns(cursor), *(v.ts for v in values)])
        moved = bool(effect.changed or effect.deleted)
        oldest = min((v.ts for v in values if v.table in set(followed)), default=None)
        pending = state.pending_ns
        if moved and oldest is not None:
            pending = oldest if pending is None else min(pending, oldest)
        await conn.execute(
            sa.update(FOLLOW)
            .where(FOLLOW.c.singleton == 1)
            .values(
                delta_cursor=_dump(cursor),
                state_ns=newest,
                version=version if moved else state.version,
                pending_ns=pending,
                updated_at=_now(),
            )
        )
        after = await _load(conn, deployment)
    assert after is not None
    return after, effect


async def mark_published(
    engine: AsyncEngine,
    deployment: str,
    version: int,
    state_ns: int,
    run_id: int,
    *,
    tables: Sequence[str],
    new_lines: Mapping[str, Mapping[str, int]] | None = None,
) -> None:
    """The state at `version` is published (the broker acknowledged it) as run `run_id`; the
    changes waiting for it are now waiting for that run's rows (`record_freshness`).

    The documents' lines and keys become those of the state published (what a later step
    may amend): with `new_lines` (an amendment, `plan_amendment`) those of the documents
    that changed, else every document's place in file order in `tables`."""
    async with engine.begin() as conn:
        state = await _locked(conn, deployment)
        if new_lines is None:
            await _number(conn, tables)
        else:
            for table in tables:
                await _add_lines(conn, table, new_lines.get(table, {}))
                await _publish_keys(conn, table, state.published_version, version)
        await conn.execute(
            sa.update(FOLLOW)
            .where(FOLLOW.c.singleton == 1)
            .values(
                published_pending_ns=FOLLOW.c.pending_ns,
                pending_ns=None,
                published_version=max(state.published_version, version),
                published_ns=state_ns,
                published_run=run_id,
                lines_run=run_id,
                updated_at=_now(),
            )
        )


async def _number(conn: AsyncConnection, tables: Sequence[str]) -> None:
    """Each document of `tables` gets its line in the state written whole (`write_folder`'s
    order) and its key there; a deleted one none. A row per document of the state: the
    lines table's indexes are built once they are all there."""
    c, lines = SOURCE_DOCUMENTS.c, SOURCE_LINES.c
    doc_id = c.doc_id.collate("C") if conn.dialect.name == "postgresql" else c.doc_id
    order = sa.func.row_number().over(order_by=(c.creation_time, doc_id))
    async with indexes_built_after(conn, SOURCE_LINES):
        for table in tables:
            await conn.execute(sa.delete(SOURCE_LINES).where(lines.source_table == table))
            await conn.execute(
                sa.insert(SOURCE_LINES).from_select(
                    ["source_table", "doc_id", "line", "creation_time", "published_key"],
                    sa.select(c.source_table, c.doc_id, order, c.creation_time, c.doc_key).where(
                        c.source_table == table, sa.not_(c.deleted)
                    ),
                )
            )


async def _add_lines(conn: AsyncConnection, table: str, lines: Mapping[str, int]) -> None:
    """The documents `lines` names (`_id` -> line) are at those lines now, where they are."""
    c = SOURCE_DOCUMENTS.c
    ids = sorted(lines)
    for start in range(0, len(ids), 500):
        await conn.execute(
            sa.delete(SOURCE_LINES).where(
                SOURCE_LINES.c.source_table == table,
                SOURCE_LINES.c.doc_id.in_(ids[start : start + 500]),
            )
        )
    if ids:
        await conn.execute(
            sa.insert(SOURCE_LINES).from_select(
                ["source_table", "doc_id", "line", "creation_time", "published_key"],
                sa.select(
                    c.source_table,
                    c.doc_id,
                    sa.cast(sa.bindparam("n"), sa.Integer),
                    c.creation_time,
                    c.doc_key,
                ).where(c.source_table == table, c.doc_id == sa.bindparam("i")),
            ),
            [{"i": i, "n": lines[i]} for i in ids],
        )


_LINE_OF_DOCUMENT = sa.and_(
    SOURCE_LINES.c.source_table == SOURCE_DOCUMENTS.c.source_table,
    SOURCE_LINES.c.doc_id == SOURCE_DOCUMENTS.c.doc_id,
)
"""A mirror document and its row in the lines table."""


async def _publish_keys(conn: AsyncConnection, table: str, after: int, upto: int) -> None:
    """The documents of `table` changed in versions (`after`, `upto`] are published: a
    deleted one has no line any more, the others their key."""
    c = SOURCE_DOCUMENTS.c
    changed = sa.and_(
        _LINE_OF_DOCUMENT, c.source_table == table, c.version > after, c.version <= upto
    )
    await conn.execute(sa.delete(SOURCE_LINES).where(sa.exists().where(changed, c.deleted)))
    await conn.execute(
        sa.update(SOURCE_LINES)
        .where(sa.exists().where(changed, sa.not_(c.deleted)))
        .values(published_key=sa.select(c.doc_key).where(_LINE_OF_DOCUMENT).scalar_subquery())
    )


def _lined(select: sa.Select[Any]) -> sa.Select[Any]:
    """`select` over the mirror with, per document, whether it is in the state published
    (`published`), its line there (`line`: NULL when it is not, or its place in file order
    moved since) and its key there (`published_key`)."""
    c, lines = SOURCE_DOCUMENTS.c, SOURCE_LINES.c
    line = sa.case((lines.creation_time == c.creation_time, lines.line), else_=None)
    published = lines.line.is_not(None).label("published")
    return select.add_columns(line.label("line"), lines.published_key, published).outerjoin_from(
        SOURCE_DOCUMENTS, SOURCE_LINES, _LINE_OF_DOCUMENT
    )


_MAX_AMENDED = 50_000
"""Changed documents of one table an amendment carries at most (it holds them in memory)."""


async def plan_amendment(
    engine: AsyncEngine, tables: Sequence[str], published_version: int
) -> tuple[dict[str, Amendment] | None, str]:
    """The changes since the state at `published_version` as an amendment of that state, per
    table that changed (`producers/amendment.py`); or None and why it cannot be one: a new
    document before the last line, a changed document without its key, or one the reader
    would refuse (the state published whole sets it aside, as an export's reader does)."""
    c = SOURCE_DOCUMENTS.c
    plan: dict[str, Amendment] = {}
    async with engine.connect() as conn:
        for table in tables:
            changed = (
                await conn.execute(
                    _lined(sa.select(c.doc_id, c.deleted, c.creation_time, c.doc_key, c.document))
                    .where(c.source_table == table, c.version > published_version)
                    .limit(_MAX_AMENDED + 1)
                )
            ).all()
            if len(changed) > _MAX_AMENDED:
                return None, f"more than {_MAX_AMENDED} {table} documents changed"
            if changed:
                amendment, reason = await _amend(conn, table, changed)
                if amendment is None:
                    return None, reason
                plan[table] = amendment
    return plan, ""


async def _amend(
    conn: AsyncConnection, table: str, changed: Sequence[Any]
) -> tuple[Amendment | None, str]:
    c = SOURCE_DOCUMENTS.c
    keys: set[str] = set()
    for row in changed:
        if row.published and row.published_key is None:  # moved or not: its old line stays
            return None, f"a changed {table} document was published without its key"
        if row.published_key is not None:
            keys.add(row.published_key)
        if row.deleted:
            continue
        if row.doc_key is None:
            return None, f"a changed {table} document has no key"
        raw = row.document.encode()
        if len(raw) > MAX_LINE_BYTES or parse_document(raw)[0] is None:
            return None, f"a changed {table} document is one the reader refuses"
        keys.add(row.doc_key)
    new = sorted(
        (r for r in changed if not r.deleted and r.line is None),
        key=lambda r: (r.creation_time, r.doc_id),
    )
    new_lines: dict[str, int] = {}
    if new:
        lines = SOURCE_LINES.c
        last = (
            await conn.execute(
                sa.select(c.creation_time, c.doc_id)
                .join(SOURCE_LINES, _LINE_OF_DOCUMENT)
                .where(
                    lines.source_table == table,
                    sa.not_(c.deleted),
                    lines.creation_time == c.creation_time,
                )
                .order_by(lines.line.desc())
                .limit(1)
            )
        ).first()
        if last is not None and (new[0].creation_time, new[0].doc_id) <= tuple(last):
            return None, f"a new {table} document comes before the last in file order"
        top = await conn.scalar(
            sa.select(sa.func.max(lines.line)).where(lines.source_table == table)
        )
        new_lines = {r.doc_id: (top or 0) + n for n, r in enumerate(new, start=1)}
    winners: dict[str, Winner] = {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), 500):
        rows = await conn.execute(
            _lined(sa.select(c.doc_key, c.doc_id, c.document)).where(
                c.source_table == table,
                c.doc_key.in_(ordered[start : start + 500]),
                sa.not_(c.deleted),
            )
        )
        for key, doc_id, document, line, _, _ in rows:
            line = new_lines.get(doc_id, line)
            if line is None:
                return None, f"a {table} document has no line in the state published"
            if key not in winners or line > winners[key].line:
                winners[key] = Winner(key, line, doc_id, document.encode())
    gone = sorted(keys - winners.keys())
    # A document in the state published has its key there (a keyless one stopped us above).
    added = sum(1 for r in changed if not r.deleted and r.published_key is None)
    left = sum(1 for r in changed if r.deleted and r.published_key is not None)
    return Amendment(
        documents=[winners[k] for k in sorted(winners)],
        gone=gone,
        new_lines=new_lines,
        present_change=added - left,
    ), ""


async def record_freshness(engine: AsyncEngine, run_id: int, seconds: float) -> None:
    """The freshness measured when the sink had committed every row of run `run_id`."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(FOLLOW)
            .where(FOLLOW.c.singleton == 1)
            .values(freshness_s=seconds, freshness_run=run_id)
        )


async def _locked(conn: AsyncConnection, deployment: str) -> FollowState:
    """The state row, locked for this transaction (two followers take turns)."""
    query = sa.select(FOLLOW).where(FOLLOW.c.singleton == 1)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    if row is None or row.deployment != deployment:
        raise RuntimeError("no follow state for this deployment")
    return _from_row(row)


async def _apply(
    conn: AsyncConnection,
    values: Sequence[LiveValue],
    followed: set[str],
    version: int,
    *,
    walked: bool = False,
) -> PageEffect:
    """Upsert `values` of the followed tables where not older than what is stored.
    `walked`: a page of a snapshot walk, whose documents the mirror most likely lacks (the
    walk starts from an empty mirror and lists each document once): on PostgreSQL they are
    COPied straight in, and upserted only when one is there already."""
    effect = PageEffect()
    latest: dict[tuple[str, str], LiveValue] = {}
    for v in values:
        if v.table not in followed:
            effect.ignored += 1
            continue
        current = latest.get((v.table, v.doc_id))
        if current is None or v.ts >= current.ts:
            latest[(v.table, v.doc_id)] = v
    if not latest:
        effect.copied = []  # nothing stored, so nothing a spool could lack
        return effect
    # Tuples in `_MIRROR_COLUMNS` order, as COPY takes them (a dict per row cost as much again).
    records = [
        (v.table, v.doc_id, v.ts, v.creation_time, v.deleted, version,
         "" if v.deleted else _dump(v.document),
         None if v.deleted else string_field(v.document, DOCUMENT_KEYS[v.table]))  # type: ignore[index]
        for _, v in sorted(latest.items())
    ]  # fmt: skip
    columns = _MIRROR_COLUMNS
    if (
        walked
        and conn.dialect.name == "postgresql"
        and await copy_new_rows(conn, SOURCE_DOCUMENTS.name, columns, records)
    ):
        _count(effect, [(table, deleted) for table, _, _, _, deleted, *_ in records])
        effect.copied = [(r[3], r[1], r[6]) for r in records if not r[4]]
    elif conn.dialect.name == "postgresql":
        # COPY and one INSERT … SELECT: a page of a thousand documents costs a fraction of
        # what as many parameter sets do.
        async with staged(conn, SOURCE_DOCUMENTS.name, columns, records) as name:
            stage = sa.table(name, *(sa.column(c) for c in columns))
            ordered = sa.select(stage).order_by(stage.c.source_table, stage.c.doc_id)
            insert = postgresql.insert(SOURCE_DOCUMENTS).from_select(list(columns), ordered)
            result = await conn.execute(_upsert(insert))
            _count(effect, result.all())
    else:
        rows = [dict(zip(columns, r, strict=True)) for r in records]
        for start in range(0, len(rows), 500):
            result = await conn.execute(
                _upsert(insert_for(conn, SOURCE_DOCUMENTS)), rows[start : start + 500]
            )
            _count(effect, result.all())
    effect.ignored += len(records) - sum(effect.changed.values()) - sum(effect.deleted.values())
    return effect


def _upsert(insert: Any) -> Any:
    """The mirror's conflict rule: a version replaces the stored one only when its `_ts` is
    newer; a deletion keeps the document's place (`_creationTime`). Returns what it wrote."""
    old, new = SOURCE_DOCUMENTS.c, insert.excluded
    keep_creation = sa.case((new.deleted, old.creation_time), else_=new.creation_time)
    return insert.on_conflict_do_update(
        index_elements=[old.source_table, old.doc_id],
        set_={
            "ts": new.ts,
            "creation_time": keep_creation,
            "deleted": new.deleted,
            "version": new.version,
            "document": new.document,
            "doc_key": new.doc_key,
        },
        where=new.ts > old.ts,
    ).returning(SOURCE_DOCUMENTS.c.source_table, SOURCE_DOCUMENTS.c.deleted)


def _count(effect: PageEffect, written: Sequence[Any]) -> None:
    for table, deleted in written:
        (effect.deleted if deleted else effect.changed)[table] += 1


def _as_ns(position: Cursor | None) -> int:
    """A position's source time: Convex's snapshots and delta cursors are timestamps in
    nanoseconds; any other position says nothing about time (0)."""
    return position if isinstance(position, int) and position > 0 else 0


async def write_folder(
    engine: AsyncEngine,
    tables: Sequence[str],
    out: Path,
    state_ns: int,
    spools: Mapping[str, TableSpool] | None = None,
) -> dict[str, int]:
    """The mirror as a folder export under `out`: `<table>/documents.jsonl` per table in
    `tables` (empty when it holds nothing), documents by `_creationTime` then `_id`, file times
    the state's source time (the export's snapshot time, SPEC §8.3). A table with a whole
    spool in `spools` (its walk, as stored) is written from that instead of read back from
    the mirror. Documents per table."""
    written: dict[str, int] = {}
    for table in tables:
        folder = out / table
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / TABLE_FILE
        spool = (spools or {}).get(table)
        with file.open("wb") as handle:
            if spool is not None and spool.whole:
                count = await asyncio.to_thread(spool.write, handle)  # a sort: off the loop
            else:
                count = await _read_back(engine, table, handle)
        os.utime(file, ns=(state_ns, state_ns))
        written[table] = count
    return written


async def _read_back(engine: AsyncEngine, table: str, handle: BinaryIO) -> int:
    """`table`'s documents in the mirror, in file order, into `handle`; how many."""
    c = SOURCE_DOCUMENTS.c
    count = 0
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # Straight from the server into the file: a row object per document cost several
            # times what the query does.
            return await copy_out_lines(conn, _FOLDER_SQL, table, out=handle)
        result = await conn.stream(
            sa.select(c.document)
            .where(c.source_table == table, sa.not_(c.deleted))
            .order_by(c.creation_time, c.doc_id)
            .execution_options(yield_per=_PAGE)
        )
        async for (document,) in result:
            handle.write(document.encode() + b"\n")
            count += 1
    return count


async def document_ids(engine: AsyncEngine, table: str) -> dict[str, bool]:
    """`_id` -> deleted, of one mirrored table (for tests and `status`)."""
    c = SOURCE_DOCUMENTS.c
    async with engine.connect() as conn:
        result = await conn.execute(sa.select(c.doc_id, c.deleted).where(c.source_table == table))
        return {doc_id: bool(deleted) for doc_id, deleted in result.all()}
