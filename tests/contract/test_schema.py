"""`db init` and the shape of the tables it makes (reference §2, SPEC §2), by reflection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db import IMPORTER, LARAVEL, create_engine, dialect_name, init_db
from khala_stream.db.engine import ensure_lookups
from khala_stream.db.importer_tables import DOCUMENT_LOOKUPS, DOCUMENTS, FOLLOW
from processors import store
from tests.contract.engine import run_on

LARAVEL_NAMES = set(LARAVEL.tables)
IMPORTER_NAMES = set(IMPORTER.tables)


def run(db_url: str, body: Callable[[AsyncEngine], Awaitable[Any]]) -> Any:
    return run_on(db_url, body, schema=False)


async def reflect(engine: AsyncEngine, fn: Callable[[sa.Inspector], Any]) -> Any:
    def _sync(conn: Connection) -> Any:
        return fn(sa.inspect(conn))

    async with engine.connect() as conn:
        return await conn.run_sync(_sync)


def test_init_db_creates_every_table_then_is_a_no_op(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        first = await init_db(engine)
        assert set(first) == LARAVEL_NAMES | IMPORTER_NAMES
        assert len(LARAVEL_NAMES) == 10
        assert all(name.startswith("khala_import_") for name in IMPORTER_NAMES)
        assert await init_db(engine) == []
        names = await reflect(engine, lambda i: set(i.get_table_names()))
        assert names >= LARAVEL_NAMES | IMPORTER_NAMES

    run(db_url, body)


def test_workers_starting_together_on_a_fresh_database_all_find_their_tables(
    db_url: str,
) -> None:
    """Six init_db at once, each on its own engine (as six workers started together): every
    one succeeds, and the tables are created exactly once."""

    created = asyncio.run(_six_workers_at_once(db_url))
    names = [name for tables in created for name in tables]
    assert sorted(names) == sorted(LARAVEL_NAMES | IMPORTER_NAMES)


def test_workers_starting_together_on_fresh_sqlite_files_never_lock_each_other_out(
    tmp_path: Path,
) -> None:
    """The SQLite race behind the previous test, repeated on 25 fresh files: switching a new file
    to WAL fails at once while other connections open it, and a failed statement once left a
    cursor whose clean-up blocked the event loop (a one-in-fifteen deadlock per file)."""

    async def races() -> list[list[list[str]]]:
        return [
            await asyncio.wait_for(
                _six_workers_at_once(f"sqlite+aiosqlite:///{tmp_path}/k{n}.sqlite"), 20
            )
            for n in range(25)
        ]

    for created in asyncio.run(races()):
        assert sorted(name for tables in created for name in tables) == sorted(
            LARAVEL_NAMES | IMPORTER_NAMES
        )


async def _six_workers_at_once(db_url: str) -> list[list[str]]:
    async def one() -> list[str]:
        engine = create_engine(db_url)
        try:
            return await init_db(engine)
        finally:
            await engine.dispose()

    return list(await asyncio.gather(*(one() for _ in range(6))))


def test_init_db_without_laravel_makes_only_importer_tables(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        assert set(await init_db(engine, laravel=False)) == IMPORTER_NAMES
        names = await reflect(engine, lambda i: set(i.get_table_names()))
        assert not names & LARAVEL_NAMES

    run(db_url, body)


def test_init_db_never_alters_an_existing_table(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(255) NOT NULL, "
                    "email VARCHAR(255) NOT NULL, is_admin BOOLEAN, extra_note TEXT)"
                )
            )
            await conn.execute(
                sa.text("INSERT INTO users (id, name, email) VALUES (7, 'Ann', 'ann@x.io')")
            )
        created = await init_db(engine)
        assert "users" not in created
        assert set(created) == (LARAVEL_NAMES - {"users"}) | IMPORTER_NAMES
        columns = await reflect(engine, lambda i: [c["name"] for c in i.get_columns("users")])
        assert columns == ["id", "name", "email", "is_admin", "extra_note"]
        async with engine.connect() as conn:
            found = (await conn.execute(sa.text("SELECT id, name FROM users"))).all()
        assert [tuple(r) for r in found] == [(7, "Ann")]

    run(db_url, body)


def test_laravel_schema_details(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        await init_db(engine)

        def inspect_all(i: sa.Inspector) -> dict[str, Any]:
            return {
                name: {
                    "columns": {c["name"]: c for c in i.get_columns(name)},
                    "unique": {
                        u["name"]: u["column_names"] for u in i.get_unique_constraints(name)
                    },
                    "indexes": {x["name"]: x["column_names"] for x in i.get_indexes(name)},
                    "pk": i.get_pk_constraint(name)["constrained_columns"],
                    "fks": i.get_foreign_keys(name),
                }
                for name in LARAVEL_NAMES
            }

        info = await reflect(engine, inspect_all)

        lengths = {
            ("users", "name"): 255,
            ("users", "email"): 255,
            ("users", "handle"): 64,
            ("users", "workos_id"): 255,
            ("users", "remember_token"): 100,
            ("threads", "id"): 36,
            ("threads", "autopilot_id"): 36,
            ("runs", "status"): 32,
            ("messages", "role"): 25,
            ("run_events", "actor_type"): 16,
            ("run_events", "type"): 64,
            ("agent_conversation_messages", "agent"): 255,
            ("autopilots", "handle"): 64,
            ("autopilots", "display_name"): 120,
            ("autopilot_profiles", "owner_display_name"): 120,
            ("autopilot_profiles", "autopilot_voice"): 64,
            ("autopilot_policies", "model_provider"): 64,
            ("autopilot_policies", "model"): 128,
        }
        for (table, column), length in lengths.items():
            col_type = info[table]["columns"][column]["type"]
            assert isinstance(col_type, sa.String), (table, column, col_type)
            assert col_type.length == length, (table, column, col_type.length)

        assert info["users"]["unique"] == {
            "users_email_unique": ["email"],
            "users_handle_unique": ["handle"],
            "users_workos_id_unique": ["workos_id"],
        }
        assert info["autopilots"]["unique"] == {"autopilots_handle_unique": ["handle"]}
        for name in ("threads", "runs", "messages", "run_events", "agent_conversations"):
            assert info[name]["unique"] == {}, name
        assert all(info[name]["fks"] == [] for name in LARAVEL_NAMES)

        assert info["threads"]["indexes"]["threads_user_id_updated_at_index"] == [
            "user_id",
            "updated_at",
        ]
        assert info["run_events"]["indexes"]["run_events_autopilot_id_type_id_index"] == [
            "autopilot_id",
            "type",
            "id",
        ]
        assert info["agent_conversation_messages"]["indexes"]["conversation_index"] == [
            "conversation_id",
            "user_id",
            "updated_at",
        ]
        assert info["autopilot_profiles"]["pk"] == ["autopilot_id"]
        assert info["users"]["pk"] == ["id"]

        cols = info["users"]["columns"]
        assert cols["handle"]["nullable"] and not cols["workos_id"]["nullable"]
        assert not cols["avatar"]["nullable"] and cols["email_verified_at"]["nullable"]
        assert info["threads"]["columns"]["autopilot_id"]["nullable"]
        assert "'user'" in str(info["run_events"]["columns"]["actor_type"]["default"])
        assert (
            "CURRENT_TIMESTAMP"
            in str(info["run_events"]["columns"]["created_at"]["default"]).upper()
        )
        assert not info["run_events"]["columns"]["created_at"]["nullable"]
        assert "active" in str(info["autopilots"]["columns"]["status"]["default"])
        assert "private" in str(info["autopilots"]["columns"]["visibility"]["default"])
        assert "1" in str(info["autopilots"]["columns"]["config_version"]["default"])
        assert "1" in str(info["autopilot_profiles"]["columns"]["schema_version"]["default"])

        async with engine.connect() as conn:
            if dialect_name(engine) == "postgresql":
                rows = (
                    await conn.execute(
                        sa.text(
                            "SELECT table_name, column_name, data_type, datetime_precision, "
                            "column_default FROM information_schema.columns "
                            "WHERE table_schema = current_schema()"
                        )
                    )
                ).all()
                by = {(r[0], r[1]): r for r in rows}
                assert by[("run_events", "payload")][2] == "json"  # not jsonb
                assert by[("runs", "meta")][2] == "json"
                assert by[("threads", "created_at")][2] == "timestamp without time zone"
                assert by[("threads", "created_at")][3] == 0
                assert by[("users", "id")][2] == "bigint"
                assert "nextval" in by[("users", "id")][4]
                assert by[("run_events", "id")][2] == "bigint"
                assert by[("autopilot_profiles", "schema_version")][2] == "smallint"
                assert by[("autopilot_policies", "l402_require_approval")][2] == "boolean"
                assert by[("autopilot_policies", "l402_require_approval")][4] == "true"
            else:
                sql = await conn.scalar(
                    sa.text("SELECT sql FROM sqlite_master WHERE name = 'run_events'")
                )
                assert "INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT" in sql
                assert "payload TEXT" in sql
                assert "created_at DATETIME" in sql

    run(db_url, body)


def test_importer_tables_shape(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        await init_db(engine, laravel=False)

        def inspect_pks(i: sa.Inspector) -> dict[str, list[str]]:
            return {
                name: i.get_pk_constraint(name)["constrained_columns"] for name in IMPORTER_NAMES
            }

        pks = await reflect(engine, inspect_pks)
        assert pks == {
            "khala_import_runs": ["id"],
            "khala_import_documents": ["source_table", "doc_key"],
            "khala_import_applied": ["run_id", "source_table"],
            "khala_import_rows": ["dest_table", "row_key"],
            "khala_import_offsets": ["consumer_group", "topic", "partition"],
            "khala_import_user_ids": ["workos_id"],
            "khala_import_workos_cache": ["workos_id"],
            "khala_import_refusals": ["id"],
            "khala_import_replayed": ["topic", "partition", "offset"],
            "khala_import_identity": ["singleton"],
            "khala_import_follow": ["singleton"],
            "khala_import_source_documents": ["source_table", "doc_id"],
            "khala_import_source_lines": ["source_table", "doc_id"],
        }
        uniques = await reflect(engine, lambda i: i.get_unique_constraints("khala_import_user_ids"))
        assert [u["column_names"] for u in uniques] == [["user_id"]]
        indexes = await reflect(engine, lambda i: i.get_indexes("khala_import_documents"))
        # The lookups of later runs are not there yet (`ensure_lookups`, below).
        assert sorted(x["column_names"] for x in indexes) == [
            ["source_table", "export_seq"],  # of the documents without a usable time
            ["source_table", "export_seq", "line"],
        ]

    run(db_url, body)


async def _store_document(engine: AsyncEngine, run_id: int, key: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(DOCUMENTS).values(
                source_table="messages",
                doc_key=key,
                content_hash="h",
                export_seq=run_id,
                line=1,
                first_seq=run_id,
                changed_seq=run_id,
                document="{}",
            )
        )


async def _lookups(engine: AsyncEngine) -> list[list[str]]:
    indexes = await reflect(engine, lambda i: i.get_indexes("khala_import_documents"))
    wanted = [list(columns) for columns in DOCUMENT_LOOKUPS.values()]
    return sorted(x["column_names"] for x in indexes if x["column_names"] in wanted)


def test_the_store_lookups_are_built_once_it_holds_an_earlier_runs_documents(
    db_url: str,
) -> None:
    """A first import does not maintain the indexes later runs look documents up by; the
    derivation of the first run after it builds them, once, however many workers ask."""

    async def body(engine: AsyncEngine) -> None:
        await init_db(engine, laravel=False)
        assert not await ensure_lookups(engine, ["messages"], 1)  # an empty store
        await _store_document(engine, 1, "m1")
        assert not await ensure_lookups(engine, ["messages"], 1)  # the run's own documents
        assert not await ensure_lookups(engine, ["threads"], 2)  # another table's run
        assert await _lookups(engine) == []
        if dialect_name(engine) == "postgresql":
            built = await asyncio.gather(
                *(ensure_lookups(engine, ["messages"], 2) for _ in range(3))
            )
        else:
            built = [await ensure_lookups(engine, ["messages"], 2)]
        assert all(built)
        assert await _lookups(engine) == sorted(map(list, DOCUMENT_LOOKUPS.values()))
        assert await ensure_lookups(engine, ["messages"], 2)  # there: nothing to do
        assert await init_db(engine, laravel=False) == []  # and init_db leaves them be
        assert len(await _lookups(engine)) == len(DOCUMENT_LOOKUPS)

    run(db_url, body)


def test_init_db_gives_a_document_store_of_an_earlier_version_its_references(
    db_url: str,
) -> None:
    """A `khala_import_documents` from before a scoped derivation looked documents up by
    thread: init_db adds the columns (NULL in the rows there: not known, so derivations stay
    full, processors/scope.py), and the next run's derivation their indexes."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "CREATE TABLE khala_import_documents (source_table VARCHAR(16) NOT NULL, "
                    "doc_key TEXT NOT NULL, content_hash VARCHAR(64) NOT NULL, doc_id TEXT, "
                    "export_seq INTEGER NOT NULL, line INTEGER NOT NULL, "
                    "first_seq INTEGER NOT NULL, changed_seq INTEGER NOT NULL, "
                    "document TEXT NOT NULL, PRIMARY KEY (source_table, doc_key))"
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO khala_import_documents VALUES "
                    "('messages', 'm1', 'h', NULL, 1, 1, 1, 1, '{}')"
                )
            )
        created = await init_db(engine, laravel=False)
        assert "khala_import_documents" not in created
        columns = await reflect(
            engine, lambda i: [c["name"] for c in i.get_columns("khala_import_documents")]
        )
        assert columns[-4:] == ["thread_key", "link_key", "timeless", "moved_seq"]
        assert await ensure_lookups(engine, ["messages"], 2)  # the next run's derivation
        assert ["source_table", "thread_key"] in await _lookups(engine)
        async with engine.connect() as conn:
            assert await store.any_unreferenced(conn, ["messages"])

    run(db_url, body)


def test_a_followed_state_of_an_earlier_version_is_published_whole_next(db_url: str) -> None:
    """Before `khala_import_source_lines` the mirror's rows held the lines of the state
    published: init_db creates the table empty and forgets which run the lines described, so
    `follow` publishes its next state whole (numbering it) instead of amending without lines."""

    async def body(engine: AsyncEngine) -> None:
        await init_db(engine, laravel=False)
        async with engine.begin() as conn:
            await conn.execute(sa.text("DROP TABLE khala_import_source_lines"))
            await conn.execute(
                sa.insert(FOLLOW).values(
                    singleton=1, deployment="https://d", phase="deltas", table_cursors="{}",
                    state_ns=1, version=3, published_version=3, published_ns=1,
                    published_run=7, lines_run=7, updated_at=sa.func.current_timestamp(),
                )
            )  # fmt: skip
        assert await init_db(engine, laravel=False) == ["khala_import_source_lines"]
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(FOLLOW.c.lines_run, FOLLOW.c.published_run))).one()
        assert tuple(row) == (None, 7)
        async with engine.begin() as conn:
            await conn.execute(sa.update(FOLLOW).values(lines_run=8))
        assert await init_db(engine, laravel=False) == []
        async with engine.connect() as conn:
            assert await conn.scalar(sa.select(FOLLOW.c.lines_run)) == 8  # only on creation

    run(db_url, body)


def test_init_db_upgrades_an_importer_table_made_by_an_earlier_version(db_url: str) -> None:
    """A `khala_import_refusals` from before refusals kept their row hash: init_db adds the
    column and its index, keeps the rows there, and the table then takes the new column."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "CREATE TABLE khala_import_refusals (id INTEGER PRIMARY KEY, "
                    "run_id INTEGER NOT NULL, dest_table VARCHAR(40) NOT NULL, "
                    "row_key TEXT NOT NULL, reason TEXT NOT NULL, created_at TIMESTAMP NOT NULL)"
                )
            )
            await conn.execute(
                sa.text(
                    "INSERT INTO khala_import_refusals VALUES "
                    "(1, 1, 'messages', 'm1', 'too long', '2026-01-02 03:04:05')"
                )
            )
        created = await init_db(engine, laravel=False)
        assert "khala_import_refusals" not in created
        columns = await reflect(
            engine, lambda i: [c["name"] for c in i.get_columns("khala_import_refusals")]
        )
        assert columns[-1] == "row_hash"
        indexes = await reflect(engine, lambda i: i.get_indexes("khala_import_refusals"))
        assert [x["column_names"] for x in indexes] == [["dest_table", "row_key"]]
        refusals = IMPORTER.tables["khala_import_refusals"]
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(refusals).values(
                    id=2,
                    run_id=2,
                    dest_table="messages",
                    row_key="m2",
                    reason="too long",
                    created_at=sa.func.current_timestamp(),
                    row_hash="h" * 64,
                )
            )
            found = (
                await conn.execute(
                    sa.select(refusals.c.row_key, refusals.c.row_hash).order_by(refusals.c.id)
                )
            ).all()
        assert [tuple(r) for r in found] == [("m1", None), ("m2", "h" * 64)]
        assert await init_db(engine, laravel=False) == []  # upgraded once

    run(db_url, body)
