"""What `follow` keeps of a deployment (producers/live_mirror.py), on both databases: whatever
order and pages the versions of documents arrive in (a version twice, a deletion before an
older version), the mirror holds the latest version of each, and writes it out as an export
lists it (`_creationTime`, then `_id`, deleted ones left out)."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.engine import indexes_built_after
from khala_stream.db.importer_tables import (
    FOLLOW,
    RETIRED_SOURCE_INDEXES,
    SOURCE_DOCUMENTS,
    SOURCE_LINES,
    SOURCE_LOOKUPS,
)
from producers import live_mirror
from producers.live_api import LiveValue, export_order
from producers.table_spool import TableSpool
from tests.contract.engine import run_on

DEPLOYMENT = "http://127.0.0.1:1"
S = 1_000


def _value(table: str, doc_id: str, ts: int, version: int, deleted: bool) -> LiveValue:
    created = float(hash((table, doc_id)) % 7)  # ties on _creationTime: _id decides
    # Text that COPY escapes (a backslash; JSON's own escapes of a quote, a newline, a tab)
    document = {"_id": doc_id, "_creationTime": created, "v": version, "text": 'a\\b "c"\n\td é'}
    return LiveValue(
        table=table,
        doc_id=doc_id,
        ts=ts,
        deleted=deleted,
        creation_time=0.0 if deleted else created,
        document={} if deleted else document,
    )


# Per document, a history of versions (ts ascending); the last may be a deletion.
_HISTORIES = st.lists(
    st.tuples(
        st.sampled_from(["users", "threads", "lightningInvoices"]),
        st.sampled_from(["a", "b", "c", "É", "z1", "Z"]),
        st.integers(min_value=1, max_value=4),
        st.booleans(),
    ),
    min_size=1,
    max_size=12,
    unique_by=lambda h: (h[0], h[1]),
)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories=_HISTORIES, seed=st.integers(0, 2**16))
def test_any_arrival_order_keeps_the_latest_version(
    db_url: str, tmp_path: Path, histories: list[tuple[str, str, int, bool]], seed: int
) -> None:
    rng = random.Random(seed)
    values: list[LiveValue] = []
    latest: dict[tuple[str, str], LiveValue] = {}
    for table, doc_id, versions, deleted_last in histories:
        for v in range(versions):
            gone = deleted_last and v == versions - 1 and v > 0
            value = _value(table, doc_id, S + 10 * v + rng.randint(0, 9), v, gone)
            values.append(value)
            latest[(table, doc_id)] = value
    snapshot = [v for v in values if rng.random() < 0.5 and not v.deleted]
    deltas = list(values)
    rng.shuffle(deltas)  # a page may bring an older version after a newer one

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:  # the database is the test's, not the example's
            await conn.execute(sa.delete(FOLLOW))
            await conn.execute(sa.delete(SOURCE_DOCUMENTS))
            await conn.execute(sa.delete(SOURCE_LINES))
        await live_mirror.start_snapshot(engine, DEPLOYMENT, S)
        spools = {t: TableSpool(tmp_path / f"{seed}-{t}.spool") for t in ("users", "threads")}
        for table, spool in spools.items():
            mine = [v for v in snapshot if v.table == table]
            cut = rng.randint(0, len(mine))
            pages = (mine[:cut], mine[cut:])
            for page in pages:  # a document may come again, on another page
                copied = await live_mirror.apply_snapshot_page(
                    engine, DEPLOYMENT, table, page, "c", True
                )
                spool.add(copied) if copied is not None else spool.give_up()
            # PostgreSQL COPies a page of new documents; what is upserted (SQLite's pages, a
            # document there already), the spool lacks. An empty page stores nothing.
            pg = engine.dialect.name == "postgresql"
            again = bool({v.doc_id for v in pages[0]} & {v.doc_id for v in pages[1]})
            assert spool.whole == ((pg or not pages[0]) and ((pg and not again) or not pages[1]))
        await live_mirror.finish_snapshot(engine, DEPLOYMENT)
        # The walked tables written from their spools are the mirror's, byte for byte.
        spooled, read_back = tmp_path / f"spooled-{seed}", tmp_path / f"read-{seed}"
        tables = list(spools)
        await live_mirror.write_folder(engine, tables, spooled, S * 10**9, spools)
        await live_mirror.write_folder(engine, tables, read_back, S * 10**9)
        for table, spool in spools.items():
            file = Path(table, "documents.jsonl")
            assert (spooled / file).read_bytes() == (read_back / file).read_bytes()
            spool.close()
        cut = rng.randint(0, len(deltas))
        for page in (deltas[:cut], deltas[cut:]):
            await live_mirror.apply_delta_page(
                engine, DEPLOYMENT, page, S + 100, ["users", "threads"]
            )
        out = tmp_path / f"export-{seed}"
        await live_mirror.write_folder(engine, ["users", "threads"], out, (S + 100) * 10**9)
        for table in ("users", "threads"):
            expected = sorted(
                (v.document for (t, _), v in latest.items() if t == table and not v.deleted),
                key=export_order,
            )
            lines = (out / table / "documents.jsonl").read_bytes().splitlines()
            assert [orjson.loads(line) for line in lines] == expected
            ids = await live_mirror.document_ids(engine, table)
            assert ids == {i: v.deleted for (t, i), v in latest.items() if t == table}
        state = await live_mirror.load_state(engine, DEPLOYMENT)
        assert state is not None and state.phase == "deltas" and state.delta_cursor == S + 100
        assert (out / "users" / "documents.jsonl").stat().st_mtime_ns == (S + 100) * 10**9

    run_on(db_url, body)


def test_a_document_a_snapshot_lists_again_keeps_its_latest_version(db_url: str) -> None:
    """Pages of a walk go straight into the mirror; one whose document is there already (a
    source listing it twice) is upserted instead, by the same rule as deltas."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(FOLLOW))
            await conn.execute(sa.delete(SOURCE_DOCUMENTS))
        await live_mirror.start_snapshot(engine, DEPLOYMENT, S)
        pages = [
            [_value("users", "a", S + 1, 1, False)],
            [_value("users", "b", S + 1, 1, False), _value("users", "a", S + 3, 3, False)],
            [_value("users", "a", S + 2, 2, False), _value("users", "c", S + 1, 1, False)],
        ]
        for page in pages:
            await live_mirror.apply_snapshot_page(engine, DEPLOYMENT, "users", page, "c", False)
        async with engine.connect() as conn:
            c = SOURCE_DOCUMENTS.c
            found = (await conn.execute(sa.select(c.doc_id, c.ts).order_by(c.doc_id))).all()
        assert [tuple(r) for r in found] == [("a", S + 3), ("b", S + 1), ("c", S + 1)]
        state = await live_mirror.load_state(engine, DEPLOYMENT)
        assert state is not None and state.table_cursors["users"] == ("c", False)

    run_on(db_url, body)


def test_the_steps_lookups_are_built_once_a_snapshot_is_walked(db_url: str) -> None:
    """The walk does not maintain the indexes only later steps look the mirror up by
    (`SOURCE_LOOKUPS`): `finish_snapshot` builds them, and a new snapshot drops them with
    the documents it replaces, and the indexes nothing reads by any more."""

    async def lookups(engine: AsyncEngine) -> set[str]:
        async with engine.connect() as conn:
            found = await conn.run_sync(
                lambda sync: sa.inspect(sync).get_indexes(SOURCE_DOCUMENTS.name)
            )
        return {i["name"] for i in found} & set(SOURCE_LOOKUPS)

    async def indexes(engine: AsyncEngine) -> set[str]:
        async with engine.connect() as conn:
            found = await conn.run_sync(
                lambda sync: sa.inspect(sync).get_indexes(SOURCE_DOCUMENTS.name)
            )
        return {str(i["name"]) for i in found}

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:  # as an earlier version left the mirror
            for name in RETIRED_SOURCE_INDEXES:
                await conn.execute(
                    sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON {SOURCE_DOCUMENTS.name} (ts)")
                )
        await live_mirror.start_snapshot(engine, DEPLOYMENT, S)
        assert not await indexes(engine) & set(RETIRED_SOURCE_INDEXES)
        page = [_value("users", "a", S + 1, 1, False)]
        await live_mirror.apply_snapshot_page(engine, DEPLOYMENT, "users", page, "c", True)
        assert await lookups(engine) == set()
        await live_mirror.finish_snapshot(engine, DEPLOYMENT)
        assert await lookups(engine) == set(SOURCE_LOOKUPS)
        await live_mirror.start_snapshot(engine, DEPLOYMENT, S + 5)
        assert await lookups(engine) == set()

    run_on(db_url, body)


async def _lines_indexes(engine: AsyncEngine) -> tuple[list[str], dict[str, list[str]]]:
    """The lines table's primary key columns, and its other indexes' columns by name."""

    def read(sync: sa.Connection) -> tuple[list[str], dict[str, list[str]]]:
        inspector = sa.inspect(sync)
        key = inspector.get_pk_constraint(SOURCE_LINES.name)["constrained_columns"]
        found = inspector.get_indexes(SOURCE_LINES.name)
        return key, {str(i["name"]): list(i["column_names"]) for i in found}

    async with engine.connect() as conn:
        return await conn.run_sync(read)


def test_a_whole_numbering_leaves_the_lines_table_keyed_and_indexed(db_url: str) -> None:
    """Numbering a state whole (its indexes built after the rows, on PostgreSQL) gives every
    document its line, over lines an earlier state left, and leaves the table with its key
    and indexes, the key still refusing a second row of a document; a block that fails
    leaves them as they were."""
    lines = SOURCE_LINES.c
    wanted = (
        [c.name for c in SOURCE_LINES.primary_key.columns],
        {str(i.name): [c.name for c in i.columns] for i in SOURCE_LINES.indexes},
    )

    async def numbered(engine: AsyncEngine) -> dict[tuple[str, str], int]:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(lines.source_table, lines.doc_id, lines.line))
            return {(t, d): n for t, d, n in rows.tuples()}

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            for table in (FOLLOW, SOURCE_DOCUMENTS, SOURCE_LINES):
                await conn.execute(sa.delete(table))
        state = await live_mirror.start_snapshot(engine, DEPLOYMENT, S)
        page = [_value(t, d, S + 1, 1, False) for t in ("users", "threads") for d in "cab"]
        for table in ("users", "threads"):
            mine = [v for v in page if v.table == table]
            await live_mirror.apply_snapshot_page(engine, DEPLOYMENT, table, mine, "c", True)
        state = await live_mirror.finish_snapshot(engine, DEPLOYMENT)
        for run in (1, 2):  # the second numbers over the first's lines
            await live_mirror.mark_published(
                engine, DEPLOYMENT, state.version, S, run, tables=["users", "threads"]
            )
            expected = {
                (t, str(doc["_id"])): n
                for t in ("users", "threads")
                for n, doc in enumerate(
                    sorted((v.document for v in page if v.table == t), key=export_order), 1
                )
            }
            assert await numbered(engine) == expected
            assert await _lines_indexes(engine) == wanted
        row = {"source_table": "users", "doc_id": "a", "line": 9, "creation_time": 0.0}
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.insert(SOURCE_LINES).values(row))
        except sa.exc.IntegrityError:
            pass
        else:
            raise AssertionError("the lines table took a second row of a document")
        try:
            async with engine.begin() as conn, indexes_built_after(conn, SOURCE_LINES):
                await conn.execute(sa.insert(SOURCE_LINES).values(row))
        except sa.exc.IntegrityError:
            pass
        else:
            raise AssertionError("the key was built over two rows of a document")
        assert await _lines_indexes(engine) == wanted
        assert await numbered(engine) == expected

    run_on(db_url, body)


def _winners(folder: Path) -> list[tuple[str, dict[str, object]]]:
    """The messages export in `folder` as the store sees it: per key its last line's document
    (SPEC §8.2), keys in the order of those lines."""
    lines = (folder / "messages" / "documents.jsonl").read_bytes().splitlines()
    last: dict[str, tuple[int, dict[str, object]]] = {}
    for n, line in enumerate(lines, start=1):
        doc = orjson.loads(line)
        if isinstance(doc.get("messageId"), str):
            last[doc["messageId"]] = (n, doc)
    return [(k, d) for k, (_, d) in sorted(last.items(), key=lambda kv: kv[1][0])]


def _amended(
    state: dict[str, tuple[int, dict[str, object]]], amendment: live_mirror.Amendment
) -> dict[str, tuple[int, dict[str, object]]]:
    after = dict(state)
    for winner in amendment.documents:
        after[winner.key] = (winner.line, orjson.loads(winner.raw))
    for key in amendment.gone:
        assert key in after, f"a tombstone for {key}, which the state does not hold"
        del after[key]
    return after


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32))
@example(seed=107)  # a document published keyless moves in file order, now with a key
def test_an_amendment_makes_the_state_a_whole_publication_would(
    db_url: str, tmp_path: Path, seed: int
) -> None:
    """Random steps of edits, deletions, new documents and key changes over keys that repeat:
    each step's amendment (`plan_amendment`), applied to what the store holds, gives the keys
    and documents a whole publication of the step gives, in the same order; the planner
    declines exactly when a changed document has no key or a new one comes before the last
    line still in the state (a deleted document's line is no one's)."""
    rng = random.Random(seed)
    keys = [f"k{n}" for n in range(6)]
    clock = [S]

    def message(doc_id: str, created: float) -> dict[str, object]:
        clock[0] += 1
        doc: dict[str, object] = {"_id": doc_id, "_creationTime": created, "text": clock[0]}
        if rng.random() < 0.9:
            doc["messageId"] = rng.choice(keys)
        return doc

    def live(doc: dict[str, object], ts: int, deleted: bool = False) -> LiveValue:
        return LiveValue(
            table="messages", doc_id=str(doc["_id"]), ts=ts, deleted=deleted,
            creation_time=float(doc["_creationTime"]), document={} if deleted else doc,  # type: ignore[arg-type]
        )  # fmt: skip

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.delete(FOLLOW))
            await conn.execute(sa.delete(SOURCE_DOCUMENTS))
            await conn.execute(sa.delete(SOURCE_LINES))
        docs = {f"d{n}": message(f"d{n}", float(rng.randint(0, 20))) for n in range(12)}
        await live_mirror.start_snapshot(engine, DEPLOYMENT, S)
        page = [live(d, S) for d in docs.values()]
        await live_mirror.apply_snapshot_page(engine, DEPLOYMENT, "messages", page, "c", True)
        state = await live_mirror.finish_snapshot(engine, DEPLOYMENT)
        folder = tmp_path / f"{seed}-0"
        await live_mirror.write_folder(engine, ["messages"], folder, S)
        await live_mirror.mark_published(
            engine, DEPLOYMENT, state.version, S, 1, tables=["messages"]
        )
        stored = await _lines_of(engine, dict(enumerate(_winners(folder))))
        for step in range(1, 5):
            ts = S + 100 * step
            changes: list[LiveValue] = []
            keyless = out_of_order = False
            moved: list[str] = []
            for doc_id in rng.sample(sorted(docs), k=min(3, len(docs))):
                was = docs[doc_id]
                if rng.random() < 0.3:
                    changes.append(live(was, ts, deleted=True))
                    keyless |= "messageId" not in was
                    del docs[doc_id]
                    continue
                created = float(was["_creationTime"])  # type: ignore[arg-type]
                if rng.random() < 0.15:  # its place in file order moves: its line is no more
                    created = float(rng.randint(0, 30))
                    if created != was["_creationTime"]:
                        moved.append(doc_id)
                docs[doc_id] = now = message(doc_id, created)
                keyless |= "messageId" not in was or "messageId" not in now
                changes.append(live(now, ts))
            # The place in file order (`_creationTime`, then `_id`) of the last line still in
            # the state: a deleted document's line is no one's, nor a moved one's, which comes
            # in order only after it, as a new document does.
            top = max(
                [(-1.0, ""), *((d["_creationTime"], i) for i, d in docs.items() if i not in moved)]  # type: ignore[list-item]
            )
            for doc_id in moved:
                out_of_order |= (docs[doc_id]["_creationTime"], doc_id) <= top  # type: ignore[operator]
            for n in range(rng.randint(0, 2)):
                created = float(top[0]) + 1 + n if rng.random() < 0.8 else float(rng.randint(0, 20))
                out_of_order |= (created, f"n{step}.{n}") <= top
                docs[f"n{step}.{n}"] = new = message(f"n{step}.{n}", created)
                keyless |= "messageId" not in new
                changes.append(live(new, ts))
            state, _ = await live_mirror.apply_delta_page(
                engine, DEPLOYMENT, changes, ts, ["messages"]
            )
            plan, reason = await live_mirror.plan_amendment(
                engine, ["messages"], state.published_version
            )
            folder = tmp_path / f"{seed}-{step}"
            await live_mirror.write_folder(engine, ["messages"], folder, ts)
            expected = _winners(folder)
            if plan is None:
                # Out of order or keyless, or a document published keyless before.
                assert out_of_order or keyless or "without its key" in reason, reason
                await live_mirror.mark_published(
                    engine, DEPLOYMENT, state.version, ts, step + 1, tables=["messages"]
                )
                stored = await _lines_of(engine, dict(enumerate(expected)))
                continue
            assert not out_of_order and not keyless
            stored = _amended(stored, plan.get("messages", live_mirror.Amendment()))
            in_order = sorted(stored.items(), key=lambda kv: kv[1][0])
            assert [(k, d) for k, (_, d) in in_order] == expected, f"step {step}"
            new_lines = {t: a.new_lines for t, a in plan.items()}
            await live_mirror.mark_published(
                engine, DEPLOYMENT, state.version, ts, step + 1, tables=["messages"],
                new_lines=new_lines,
            )  # fmt: skip

    run_on(db_url, body)


async def _lines_of(
    engine: AsyncEngine, winners: dict[int, tuple[str, dict[str, object]]]
) -> dict[str, tuple[int, dict[str, object]]]:
    """The store's view after a whole publication: each key's winner at the line the mirror
    gave its document."""
    c = SOURCE_LINES.c
    async with engine.connect() as conn:
        lines = dict(
            (await conn.execute(sa.select(c.doc_id, c.line).where(c.source_table == "messages")))
            .tuples()
            .all()
        )
    return {k: (lines[str(d["_id"])], d) for _, (k, d) in winners.items()}
