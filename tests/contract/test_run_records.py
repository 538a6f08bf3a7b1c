"""Run records in the database (`khala_import_runs`): a run is read back with the typed
manifest and summary it was recorded with; a row written before the records had versions is
still read; one written by a newer khala-stream is refused with a clear error."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from khala_stream.db.importer_tables import RUNS
from khala_stream.errors import UnknownRecordVersion
from tests.contract.engine import run_on

SHA = "12" * 32
OPTIONS = import_runs.RunOptions(replace=True, propagate_deletes=True, incremental=False)


async def _registered(engine: AsyncEngine) -> int:
    return await import_runs.register(engine, source="export.zip", sha256=SHA, options=OPTIONS)


async def _store(engine: AsyncEngine, run_id: int, **values: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.update(RUNS).where(RUNS.c.id == run_id).values(**values))


def test_a_run_reads_back_its_options_manifest_and_summary(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> import_runs.ImportRun | None:
        run_id = await _registered(engine)
        manifest = PublishManifest(
            run_id=run_id, export_sha256=SHA, published={"users": 2}, order={"users": "ff"}
        )
        await import_runs.mark_published(engine, run_id, manifest=manifest, snapshot_ms=9)
        assert await import_runs.claim(engine, run_id, "w", 30)
        summary = DerivationSummary(counters={"users_imported": 2}, written={"users": 2})
        assert await import_runs.mark_derived(
            engine, run_id, "w", summary=summary, changes_end={0: 4}
        )
        return await import_runs.load(engine, run_id)

    run = run_on(db_url, body, laravel=False)
    assert run is not None and run.status == "derived"
    assert run.options == OPTIONS
    assert run.manifest is not None and run.manifest.published == {"users": 2}
    assert run.manifest.run_id == run.id and run.manifest.order == {"users": "ff"}
    assert run.summary == DerivationSummary(counters={"users_imported": 2}, written={"users": 2})


def test_a_run_stored_before_versions_is_read(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> import_runs.ImportRun | None:
        run_id = await _registered(engine)
        await _store(
            engine,
            run_id,
            status="derived",
            expected=orjson.dumps({"published": {"users": 2}, "source": {"users": 3}}).decode(),
            counters=orjson.dumps(
                {"users_imported": 2, "written": {"users": 2}, "derivation_skipped": False}
            ).decode(),
        )
        return await import_runs.load(engine, run_id)

    run = run_on(db_url, body, laravel=False)
    assert run is not None and run.manifest is not None and run.summary is not None
    assert run.manifest.run_id == run.id and run.manifest.export_sha256 == SHA
    assert run.manifest.published == {"users": 2} and run.manifest.source == {"users": 3}
    assert run.summary.counters == {"users_imported": 2}
    assert run.summary.written == {"users": 2} and run.summary.skipped is False


@pytest.mark.parametrize("column", ["expected", "counters"])
def test_a_run_written_by_a_newer_version_is_refused(db_url: str, column: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        run_id = await _registered(engine)
        await _store(engine, run_id, **{column: orjson.dumps({"v": 42}).decode()})
        await import_runs.load(engine, run_id)

    with pytest.raises(UnknownRecordVersion, match="has version 42, and this khala-stream"):
        run_on(db_url, body, laravel=False)


def test_a_run_registered_after_another_only_while_that_one_is_the_newest(db_url: str) -> None:
    """`register_after`: concurrent registrations cannot both come right after one run."""

    async def body(engine: AsyncEngine) -> list[int | None]:
        first = await _registered(engine)
        after = [
            import_runs.register_after(
                engine, first, source="older.zip", sha256=SHA, options=OPTIONS
            )
            for _ in range(4)
        ]
        return [first, *await asyncio.gather(*after)]

    first, *after = run_on(db_url, body, laravel=False)
    assert first is not None
    assert [a for a in after if a is not None] == [first + 1], after
