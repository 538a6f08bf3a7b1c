"""Derivation claims (`khala_stream/import_runs.py`): one worker derives a run at a time, and a
worker whose claim was taken over can neither renew it nor record the run as derived."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from tests.contract.engine import run_on

LEASE_S = 2  # claims are stamped to the second: at least two, or a claim could expire at once


async def _published_run(engine: AsyncEngine) -> int:
    options = import_runs.RunOptions()
    sha256 = "0" * 64
    run_id = await import_runs.register(engine, source="export.zip", sha256=sha256, options=options)
    manifest = PublishManifest(run_id=run_id, export_sha256=sha256)
    await import_runs.mark_published(engine, run_id, manifest=manifest, snapshot_ms=1)
    return run_id


async def _derived(engine: AsyncEngine, run_id: int, worker: str, marker: int) -> bool:
    return await import_runs.mark_derived(
        engine,
        run_id,
        worker,
        summary=DerivationSummary(counters={"by": marker}),
        changes_end={0: marker},
    )


def test_a_claim_taken_over_can_neither_be_renewed_nor_record_the_run(db_url: str) -> None:
    async def body(engine: AsyncEngine) -> None:
        run_id = await _published_run(engine)
        assert await import_runs.claim(engine, run_id, "a", LEASE_S)
        assert not await import_runs.claim(engine, run_id, "b", LEASE_S)  # a holds it
        assert await import_runs.heartbeat(engine, run_id, "a")
        await asyncio.sleep(LEASE_S * 1.75)  # a's database was away for longer than the lease
        assert await import_runs.claim(engine, run_id, "b", LEASE_S)
        assert not await import_runs.heartbeat(engine, run_id, "a")
        assert not await _derived(engine, run_id, "a", 1)
        assert await _derived(engine, run_id, "b", 2)
        assert not await _derived(engine, run_id, "b", 3)  # recorded once
        run = await import_runs.load(engine, run_id)
        assert run is not None and run.status == "derived"
        assert run.summary is not None and run.summary.counters == {"by": 2}
        assert run.changes_end == {0: 2}

    run_on(db_url, body, laravel=False)
