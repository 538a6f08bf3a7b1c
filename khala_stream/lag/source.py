"""The lag of a followed deployment (`khala-stream follow`), as `lag` shows it beside the
consumer groups: read from `khala_import_follow` in the database, never from the deployment
(no key needed to watch).

    behind_s     newest change the source reported minus the newest one published
    freshness_s  the last end-to-end freshness `follow` measured: a change's source `_ts` to
                 the sink's commit of the run that carried it
    poll_age_s   how long ago `follow` last heard from the source (a stopped `follow` ages)
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from khala_stream.db.engine import create_engine
from khala_stream.db.importer_tables import FOLLOW


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceLag:
    deployment: str
    phase: str
    newest_ns: int
    published_ns: int
    waiting: bool
    """Changes read but not yet published."""
    freshness_s: float | None
    freshness_run: int | None
    poll_age_s: float

    @property
    def behind_s(self) -> float:
        return max(0.0, (self.newest_ns - self.published_ns) / 1e9) if self.waiting else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "phase": self.phase,
            "newest_change": _iso(self.newest_ns),
            "published_up_to": _iso(self.published_ns),
            "behind_seconds": round(self.behind_s, 3),
            "freshness_seconds": None if self.freshness_s is None else round(self.freshness_s, 3),
            "freshness_run": self.freshness_run,
            "poll_age_seconds": round(self.poll_age_s, 1),
        }

    def line(self) -> str:
        fresh = "not measured yet" if self.freshness_s is None else f"{self.freshness_s:.1f}s"
        if self.phase == "snapshot":
            state = "walking the snapshot"
        else:
            state = f"behind {self.behind_s:.1f}s (published up to {_iso(self.published_ns)})"
        return (
            f"source {self.deployment}: {state}, newest change {_iso(self.newest_ns)},"
            f" freshness {fresh}, last poll {self.poll_age_s:.0f}s ago"
        )


def _iso(ns: int) -> str:
    if ns <= 0:
        return "-"
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


async def source_lag(database_url: str, *, timeout_s: float = 5.0) -> SourceLag | None:
    """The followed deployment's lag, or None when the database follows none (or cannot be
    read within `timeout_s`: `lag` is about the broker first, and must neither fail nor hang
    for want of the database). A SQLite file that does not exist is not created."""
    try:
        url = sa.engine.make_url(database_url)
    except sa.exc.ArgumentError:
        return None
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).exists()):
        return None
    try:
        return await asyncio.wait_for(_read(database_url), timeout_s)
    except TimeoutError:
        return None


async def _read(database_url: str) -> SourceLag | None:
    engine = create_engine(database_url)
    try:
        with contextlib.suppress(Exception):
            async with engine.connect() as conn:
                names = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
                if FOLLOW.name not in names:
                    return None
                row = (await conn.execute(sa.select(FOLLOW))).first()
            if row is None:
                return None
            updated = row.updated_at.replace(tzinfo=UTC)
            return SourceLag(
                deployment=row.deployment,
                phase=row.phase,
                newest_ns=int(row.state_ns),
                published_ns=int(row.published_ns),
                waiting=int(row.version) > int(row.published_version),
                freshness_s=row.freshness_s,
                freshness_run=row.freshness_run,
                poll_age_s=max(0.0, (datetime.now(tz=UTC) - updated).total_seconds()),
            )
        return None
    finally:
        await engine.dispose()
