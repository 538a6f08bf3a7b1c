"""The document store (processors/store.py) on both databases: what the derivation reads back,
page by page, and the statistics PostgreSQL plans the publisher's marking with."""

from __future__ import annotations

import hashlib

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.contract.documents import keyless_key
from khala_stream.db.queries import stored_before
from khala_stream.db.statistics import Growth
from processors import store
from processors.linkage import document_refs
from producers.ledger import _MARK_PG
from tests.contract.engine import explained, run_on


def _documents(
    table: str, count: int, text: int, *, run_id: int = 1
) -> list[store.IncomingDocument]:
    documents = []
    for line in range(count):
        raw = orjson.dumps({"_id": f"{table}-{line}", "body": "x" * text})
        documents.append(
            store.IncomingDocument(
                run_id=run_id,
                table=table,
                key=f"{table}-{line}",
                line=line,
                content_hash=hashlib.sha256(raw).hexdigest(),
                doc_id=f"{table}-{line}",
                raw=raw,
            )
        )
    return documents


async def _apply(engine: AsyncEngine, documents: list[store.IncomingDocument]) -> None:
    for start in range(0, len(documents), 2000):
        async with engine.begin() as conn:
            await store.apply_documents(conn, documents[start : start + 2000])


def test_documents_stored_before_a_run_are_those_of_earlier_runs(db_url: str) -> None:
    async def stored(engine: AsyncEngine, tables: list[str], run_id: int) -> bool:
        async with engine.connect() as conn:
            return await stored_before(conn, tables, run_id)

    async def body(engine: AsyncEngine) -> None:
        assert not await stored(engine, ["threads"], 1)  # a first import: all new
        await _apply(engine, _documents("threads", 3, 10, run_id=1))
        assert not await stored(engine, ["threads"], 1)  # this run's own
        assert await stored(engine, ["threads"], 2)
        assert await stored(engine, ["messages", "threads"], 2)
        assert not await stored(engine, ["messages"], 2)

    run_on(db_url, body)


def test_a_first_import_is_copied_and_a_key_stored_twice_still_upserts(db_url: str) -> None:
    """`fresh` batches go straight in by COPY on PostgreSQL; a key the store already holds
    (a document twice in one export) sends the batch through the upsert instead, on either
    database: the later line wins and nothing is stored twice."""

    async def stored(engine: AsyncEngine) -> list[tuple[str, int, str]]:
        async with engine.connect() as conn:
            query = sa.text(
                "SELECT doc_key, line, document FROM khala_import_documents ORDER BY doc_key"
            )
            return [(k, n, doc) for k, n, doc in (await conn.execute(query)).all()]

    async def body(engine: AsyncEngine) -> None:
        first = _documents("threads", 3, 10)
        async with engine.begin() as conn:
            await store.apply_documents(conn, first, fresh=True)
        again = store.IncomingDocument(
            run_id=1, table="threads", key="threads-1", line=7, content_hash="0" * 64,
            doc_id="threads-1", raw=b'{"_id":"threads-1","body":"later"}',
        )  # fmt: skip
        new = _documents("threads", 5, 10)[4]
        async with engine.begin() as conn:
            await store.apply_documents(conn, [again, new], fresh=True)
        assert await stored(engine) == [
            ("threads-0", 0, first[0].raw.decode()),
            ("threads-1", 7, '{"_id":"threads-1","body":"later"}'),
            ("threads-2", 2, first[2].raw.decode()),
            ("threads-4", 4, new.raw.decode()),
        ]
        async with engine.connect() as conn:
            assert await store.applied_counts(conn, 1) == {"threads": 5}

    run_on(db_url, body)


def test_pages_come_back_in_file_order_and_hold_a_bounded_amount_of_text(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        # Small documents: pages of 2,000. Large ones (3 KB): pages cut at about 512 KB.
        await _apply(engine, _documents("messages", 4500, 10))
        await _apply(engine, _documents("blueprints", 700, 3000))
        small = [page async for page in store.iter_pages(engine, "messages", 1)]
        large = [page async for page in store.iter_pages(engine, "blueprints", 1)]
        assert [len(p) for p in small] == [2000, 2000, 500]
        assert [d.line for p in small for d in p] == list(range(4500))
        assert [d.line for p in large for d in p] == list(range(700))
        assert len(large) > 2
        for page in large:
            assert sum(len(orjson.dumps(d.doc)) for d in page[:-1]) < store._PAGE_TEXT
        assert large[0][0].doc == {"_id": "blueprints-0", "body": "x" * 3000}

    run_on(db_url, body)


def test_a_growing_store_keeps_the_marking_on_the_primary_key(pg_url: str) -> None:
    """Without fresh statistics the planner takes the run's documents for a few rows and
    answers the publisher's marking by reading all of them (quadratic over an import)."""

    async def plan(engine: AsyncEngine) -> str:
        keys = [f"messages-{n}" for n in range(0, 40_000, 800)]  # 50 of 40,000
        params = {
            "run": 1,
            "table": "messages",
            "keys": keys,
            "hashes": ["0" * 64] * len(keys),
            "lines": list(range(len(keys))),
        }
        return await explained(engine, _MARK_PG, params)

    async def body(engine: AsyncEngine) -> tuple[str, str]:
        growing = Growth(engine, lambda _table: ["khala_import_documents"])
        documents = _documents("messages", 40_000, 10)
        await _apply(engine, documents[:20_000])
        before = await plan(engine)
        await _apply(engine, documents[20_000:])
        growing.added({"messages": 40_000})
        await growing.refresh_if_due()
        return before, await plan(engine)

    before, after = run_on(pg_url, body)
    # The planner's choice without statistics (what the ANALYZE is there for) ...
    assert "khala_import_documents_source_table_export_seq_line_index" in before
    # ... and with them: one probe of the primary key per marked document.
    assert "khala_import_documents_pkey" in after
    assert "export_seq_line_index" not in after


def test_the_store_is_analyzed_when_its_own_rows_double_whichever_tables_filled_it(
    pg_url: str,
) -> None:
    """Growth counts rows per table ANALYZEd, not per key: documents of six source tables fill
    one store, which is analyzed once per doubling of its rows (per key it was six times as
    often), without the statistics of the documents' text that no plan uses."""

    async def analyzed(engine: AsyncEngine) -> tuple[float, set[str]]:
        async with engine.connect() as conn:
            rows = await conn.scalar(
                sa.text("SELECT reltuples FROM pg_class WHERE relname = 'khala_import_documents'")
            )
            columns = await conn.execute(
                sa.text("SELECT attname FROM pg_stats WHERE tablename = 'khala_import_documents'")
            )
            return float(rows), {name for (name,) in columns}

    async def body(engine: AsyncEngine) -> list[tuple[float, set[str]]]:
        async with engine.begin() as conn:  # no ANALYZE but the stage's own
            await conn.execute(
                sa.text("ALTER TABLE khala_import_documents SET (autovacuum_enabled = false)")
            )
        growing = Growth(engine, lambda _table: ["khala_import_documents"], first_after=1000)
        seen = []
        for table in ("messages", "runs", "threads"):
            await _apply(engine, _documents(table, 600, 10))
            growing.added({table: 600})
            await growing.refresh_if_due()
            seen.append(await analyzed(engine))
        return seen

    (first, second, third) = run_on(pg_url, body)
    assert first[0] < 0  # 600 rows: never analyzed yet
    assert second[0] == 1200  # 1,200 rows of two tables: analyzed
    assert {"source_table", "doc_key", "export_seq", "line"} <= second[1]
    assert not {"document", "content_hash", "doc_id"} & second[1]
    assert third[0] == 1200  # 1,800 < 2,400: not again


def test_keyless_documents_are_read_back_but_never_counted_or_vanished(db_url: str) -> None:
    """Issue 22 item 8: a message without `messageId` is in the store for the title scan only;
    the document statistics and --propagate-deletes never see it (a `%` or `_` in a real key
    is no wildcard for that)."""

    def message(key: str, line: int, run_id: int) -> store.IncomingDocument:
        raw = orjson.dumps({"threadId": "t", "role": "user", "text": key})
        return store.IncomingDocument(
            run_id=run_id,
            table="messages",
            key=key,
            line=line,
            content_hash=hashlib.sha256(raw).hexdigest(),
            doc_id=None,
            raw=raw,
        )

    keyless = keyless_key("messages", 1, "d" * 64)
    assert keyless is not None and keyless_key("users", 1, "d" * 64) is None
    assert not keyless.startswith(tuple("0123456789abcdefghijklmnopqrstuvwxyz_%"))

    async def body(engine: AsyncEngine) -> None:
        await _apply(engine, [message(keyless, 1, 1), message("m_1", 2, 1), message("%x", 3, 1)])
        pages = [d async for page in store.iter_pages(engine, "messages", 1) for d in page]
        assert [d.key for d in pages] == [keyless, "m_1", "%x"]  # the derivation reads all
        async with engine.connect() as conn:
            changes = await store.table_changes(conn, 1, ["messages"], {})
        assert changes["messages"] == store.TableChanges(inserted=2)
        # The next export holds none of them: only the keyed ones vanished.
        async with engine.connect() as conn:
            changes = await store.table_changes(conn, 2, ["messages"], {})
            vanished = await store.vanished_keys(conn, "messages", 2)
        assert changes["messages"] == store.TableChanges(deleted=2)
        assert sorted(vanished) == ["%x", "m_1"]

    run_on(db_url, body)


def _message(
    run_id: int, line: int, key: str, thread: str, text: str, generation: int | None = None
) -> store.IncomingDocument:
    doc = {"_id": key, "threadId": thread, "messageId": key, "text": text}
    raw = orjson.dumps(doc)
    thread_key, link_key, timeless = document_refs("messages", key, doc)
    return store.IncomingDocument(
        run_id=run_id, table="messages", key=key, line=line,
        content_hash=hashlib.sha256(raw).hexdigest(), doc_id=key, raw=raw,
        thread_key=thread_key, link_key=link_key, timeless=timeless, generation=generation,
    )  # fmt: skip


def _tombstone(run_id: int, key: str, generation: int) -> store.IncomingDocument:
    return store.IncomingDocument(
        run_id=run_id, table="messages", key=key, line=0, content_hash="0" * 64, doc_id=None,
        raw=b"", generation=generation, deleted=True,
    )  # fmt: skip


def test_the_store_finds_what_a_run_changed_and_what_moved_by_thread(db_url: str) -> None:
    """What a scoped derivation reads (processors/scope.py): the documents a run inserted or
    changed, those it lost, the documents of a thread; a document whose thread changed is
    marked moved in that run, one whose text changed is not; one gone before the run before
    lingers."""

    async def body(engine: AsyncEngine) -> None:
        first = [_message(1, n, f"m{n}", "t1" if n < 2 else "t2", "a") for n in range(4)]
        await _apply(engine, first)
        await _apply(
            engine,
            [_message(2, 0, "m0", "t1", "edited"), _message(2, 1, "m1", "t2", "a"),
             _message(2, 2, "m2", "t2", "a"), _message(2, 4, "m4", "t3", "new")],
        )  # fmt: skip
        async with engine.connect() as conn:
            changed = await store.changed_documents(conn, "messages", 2, 2)
            assert {(d.key, d.thread_key, d.inserted, d.moved) for d in changed} == {
                ("m0", "t1", False, False),
                ("m1", "t2", False, True),
                ("m4", "t3", True, False),
            }
            # m2 is unchanged: the publisher marked it (here: stored again, same content).
            gone = await store.newly_vanished(conn, "messages", 2, 2, 1)
            assert [(d.key, d.thread_key, d.present) for d in gone] == [("m3", "t2", False)]
            assert await store.changed_documents(conn, "messages", 2, 1) == []  # carried
            assert not await store.lingering(conn, "messages", 1)
            assert await store.lingering(conn, "messages", 2)  # m3, from run 1
            of_t2 = await store.referring(conn, "messages", "thread_key", ["t2"], 2, "doc_key")
            assert of_t2 == {"m1", "m2"}
            assert not await store.any_unreferenced(conn, ["messages"])
        pages = [
            [d.key for d in page]
            async for page in store.documents_of_threads(engine, "messages", ["t2", "t3"], 2)
        ]
        assert pages == [["m1", "m2", "m4"]]

    run_on(db_url, body)


def test_an_amendment_changes_its_generation_in_place(db_url: str) -> None:
    """A `follow` amendment (run 3 of generation 2): what it sends replaces the stored version
    of that generation whatever its line, a tombstone takes its key out of the generation, a
    document back after it vanished counts as moved; the rest stays as run 2 stored it, and
    the generation reads as the amended export, in line order."""

    async def body(engine: AsyncEngine) -> None:
        await _apply(engine, [_message(1, 2 * n, f"m{n}", "t1", "a") for n in range(5)])
        # Run 2: m3 vanished (stays in the store, under run 1).
        await _apply(engine, [_message(2, 2 * n, f"m{n}", "t1", "a") for n in (0, 1, 2, 4)])
        async with engine.connect() as conn:
            two = await store.table_changes(conn, 2, ["messages"], {})
        await _apply(
            engine,
            [_message(3, 0, "m0", "t1", "edited", 2),
             _message(3, 3, "m2", "t2", "from an earlier line", 2),  # the key's new winner
             _message(3, 6, "m3", "t1", "a", 2),  # back, as it was
             _message(3, 19, "m9", "t1", "new", 2),
             _tombstone(3, "m4", 2)],
        )  # fmt: skip
        async with engine.connect() as conn:
            changed = await store.changed_documents(conn, "messages", 3, 2)
            assert {(d.key, d.inserted, d.moved) for d in changed} == {
                ("m0", False, False),
                ("m2", False, True),
                ("m3", False, True),
                ("m9", True, False),
            }
            gone = await store.newly_vanished(conn, "messages", 3, 2, 2)
            assert [(d.key, d.thread_key) for d in gone] == [("m4", "t1")]
            changes = await store.table_changes(conn, 3, ["messages"], {"messages": 2})
            assert changes["messages"] == store.TableChanges(
                inserted=1, updated=3, unchanged=1, deleted=1
            )
            # Counted from run 2's statistics and run 3's changes alone: the same.
            before = store.Before(generations={"messages": 2}, documents=two)
            assert (
                await store.table_changes(conn, 3, ["messages"], {"messages": 2}, before) == changes
            )
            assert await store.vanished_keys(conn, "messages", 2) == ["m4"]
        pages = [
            [(d.key, d.line, d.doc["text"]) for d in page]
            async for page in store.iter_pages(engine, "messages", 2)
        ]
        assert pages == [
            [("m0", 0, "edited"), ("m1", 2, "a"), ("m2", 3, "from an earlier line"),
             ("m3", 6, "a"), ("m9", 19, "new")]
        ]  # fmt: skip
        # Delivered again (a replay after a crash), the amendment changes nothing more; a
        # tombstone of an older run does not take out what a newer amendment wrote.
        await _apply(engine, [_message(3, 0, "m0", "t1", "edited", 2), _tombstone(3, "m4", 2)])
        await _apply(engine, [_message(4, 0, "m0", "t1", "edited again", 2)])
        await _apply(engine, [_tombstone(3, "m0", 2)])
        async with engine.connect() as conn:
            assert [d.key for d in await store.changed_documents(conn, "messages", 4, 2)] == ["m0"]
            assert await store.newly_vanished(conn, "messages", 4, 2, 2) == []

    run_on(db_url, body)
