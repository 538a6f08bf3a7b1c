"""An export older than the state `follow` published into the same database (issue 25).

Documents are versioned by time: an export's by its snapshot time, a live deployment's by
`_ts`. Once `follow` has published its deployment's state as of time T, every document of the
tables it follows is known as of T: in that state, or absent from it because it was deleted
by then. So an export taken before T is older for every document of those tables, and the
later state wins document by document by keeping them as they are: the export's run carries
them over from the run just before it (`PublishManifest.carried`), which holds follow's state
(or a newer one), and reads only the tables `follow` does not follow. An export of nothing
but followed tables changes nothing.

The run is registered right after the newest run, once that one is derived (its documents
are in the store): `import_runs.register_after`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs
from khala_stream.contract.runs import PublishManifest
from khala_stream.db.importer_tables import FOLLOW
from khala_stream.errors import RuntimeFailure


@dataclass(frozen=True, slots=True, kw_only=True)
class LaterState:
    """What an older export's run keeps: `tables` as run `base` holds them."""

    base: PublishManifest
    tables: tuple[str, ...]
    """The tables `follow` publishes; the export's versions of them are older."""
    snapshot_ms: int
    """The source time of `base`: the state's (SPEC §8.3), so kept rows do not move."""


class StateMoved(RuntimeFailure):
    """The run just before an older export's run is not derived: it cannot keep its state."""

    def __init__(self, run_id: int) -> None:
        super().__init__(
            f"run {run_id}: its export is older than the state of the deployment this database"
            " follows, and the run before it is not derived, so it cannot keep that state;"
            " nothing was published: rerun"
        )


async def followed_after(engine: AsyncEngine, snapshot_ms: int) -> int | None:
    """The run `follow` last published when its state is newer than `snapshot_ms`, else None
    (the database follows no deployment, or the export is not older). The importer's tables
    exist (`open_database` made them)."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(FOLLOW.c.published_ns, FOLLOW.c.published_run))).first()
    if row is None or row.published_run is None or row.published_ns <= snapshot_ms * 1_000_000:
        return None
    return int(row.published_run)


async def later_state(engine: AsyncEngine, run_id: int, snapshot_ms: int) -> LaterState | None:
    """What run `run_id` of an export taken at `snapshot_ms` keeps (module docstring); None
    when the export is not older than the followed state. StateMoved when the run before it is
    not derived."""
    followed = await followed_after(engine, snapshot_ms)
    if followed is None:
        return None
    async with engine.connect() as conn:
        before = await import_runs.derived_just_before(conn, run_id)
    follow_run = await import_runs.load(engine, followed)
    if (
        before is None
        or before.manifest is None
        or follow_run is None
        or follow_run.manifest is None
    ):
        raise StateMoved(run_id)
    tables = tuple(t for t in follow_run.manifest.tables if t in before.manifest.tables)
    return LaterState(
        base=before.manifest,
        tables=tables,
        snapshot_ms=max(snapshot_ms, before.snapshot_ms or 0),
    )
