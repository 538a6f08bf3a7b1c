"""Import runs: one row per published export in `khala_import_runs`, shared by the stages.

The publisher registers a run and records what it published; the processors derive a run once
all of its messages are in their store; the sink's positions tell when its changes are applied.
A new run supersedes the earlier ones not yet derived: the publisher moves the documents they
share to the new run, so an earlier derivation would see only part of its export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from khala_stream.contract import codec
from khala_stream.contract.runs import DerivationSummary, PublishManifest
from khala_stream.db.importer_tables import OFFSETS, RUNS
from khala_stream.errors import RuntimeFailure

FOLLOW_SOURCE: Final = "follow "
"""How the source of a run `follow` published begins (`follow <deployment> cursor=<cursor>`)."""


class Superseded(RuntimeFailure):
    """A newer import of this database registered its run before this one was derived."""

    def __init__(self, run_id: int) -> None:
        super().__init__(
            f"run {run_id} was superseded by a newer import into this database before it was"
            " derived (two imports at once, or an import started again after one was stopped):"
            " the newer import brings this export's documents in; wait for it to finish"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """The options of one import run: given to `import-chat` or `publish`, stored with the
    run when it is registered, and honoured by the processors when they derive it."""

    replace: bool = False
    skip_blueprints: bool = False
    resolve_workos_users: bool = False
    propagate_deletes: bool = False
    incremental: bool = True
    """Send only new and changed documents (`import-chat` always does)."""

    def to_json(self) -> dict[str, bool]:
        return {
            "replace": self.replace,
            "skip_blueprints": self.skip_blueprints,
            "resolve_workos_users": self.resolve_workos_users,
            "propagate_deletes": self.propagate_deletes,
            "incremental": self.incremental,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunOptions:
        return cls(**{k: bool(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportRun:
    id: int
    export_sha256: str
    source: str
    options: RunOptions
    status: str
    manifest: PublishManifest | None = None
    """What was published; None while the run is publishing."""
    summary: DerivationSummary | None = None
    """What the derivation did; None until the run is derived."""
    changes_end: dict[int, int] = field(default_factory=dict)
    snapshot_ms: int | None = None


def _now() -> datetime:
    return datetime.now(tz=UTC).replace(tzinfo=None, microsecond=0)


def _json(value: str | None) -> Any:
    return orjson.loads(value) if value else {}


def from_row(row: sa.Row[Any]) -> ImportRun:
    """An ImportRun from a row of `khala_import_runs`."""
    run_id = int(row.id)
    return ImportRun(
        id=run_id,
        export_sha256=row.export_sha256,
        source=row.source,
        options=RunOptions.from_json(_json(row.options)),
        status=row.status,
        manifest=(
            codec.decode_manifest(row.expected, run_id=run_id, export_sha256=row.export_sha256)
            if row.expected
            else None
        ),
        summary=codec.decode_summary(row.counters, run_id=run_id) if row.counters else None,
        changes_end={int(p): int(o) for p, o in _json(row.changes_end).items()},
        snapshot_ms=row.snapshot_ms,
    )


_PENDING: Final = ("publishing", "published")  # runs not derived yet


async def register(engine: AsyncEngine, *, source: str, sha256: str, options: RunOptions) -> int:
    """A new run, publishing; earlier runs not derived yet are superseded (module docstring)."""
    async with engine.begin() as conn:
        return await _register(conn, source=source, sha256=sha256, options=options)


async def register_after(
    engine: AsyncEngine, after: int, *, source: str, sha256: str, options: RunOptions
) -> int | None:
    """As `register`, only while run `after` is the newest; None (nothing registered) once
    another run came after it."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # SQLite has one writer at a time anyway
            await conn.execute(sa.text(f"LOCK TABLE {RUNS.name} IN EXCLUSIVE MODE"))
        if await conn.scalar(sa.select(sa.func.max(RUNS.c.id))) != after:
            return None
        return await _register(conn, source=source, sha256=sha256, options=options)


async def _register(conn: AsyncConnection, *, source: str, sha256: str, options: RunOptions) -> int:
    result = await conn.execute(
        sa.insert(RUNS)
        .values(
            export_sha256=sha256,
            source=source,
            options=orjson.dumps(options.to_json()).decode(),
            status="publishing",
            created_at=_now(),
        )
        .returning(RUNS.c.id)
    )
    run_id = int(result.scalar_one())
    await conn.execute(
        sa.update(RUNS)
        .where(RUNS.c.id < run_id, RUNS.c.status.in_(_PENDING))
        .values(status="superseded", claim=None, claimed_at=None)
    )
    return run_id


async def mark_published(
    engine: AsyncEngine, run_id: int, *, manifest: PublishManifest, snapshot_ms: int
) -> None:
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.status.in_(_PENDING))
            .values(
                status="published",
                expected=codec.encode_manifest(manifest).decode(),
                snapshot_ms=snapshot_ms,
                published_at=_now(),
            )
        )
    if not result.rowcount:
        raise Superseded(run_id)


async def load(engine: AsyncEngine, run_id: int) -> ImportRun | None:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(RUNS).where(RUNS.c.id == run_id))).first()
    return from_row(row) if row is not None else None


async def published_runs(conn: AsyncConnection) -> list[ImportRun]:
    """Runs whose documents are all published and that still wait for their derivation."""
    rows = (
        await conn.execute(sa.select(RUNS).where(RUNS.c.status == "published").order_by(RUNS.c.id))
    ).all()
    return [from_row(r) for r in rows]


async def claim(engine: AsyncEngine, run_id: int, worker: str, lease_s: float) -> bool:
    """Take the derivation of a run; a claim older than the lease is taken over (crashed)."""
    now = _now()
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(RUNS)
            .where(
                RUNS.c.id == run_id,
                RUNS.c.status == "published",
                sa.or_(
                    RUNS.c.claim.is_(None),
                    RUNS.c.claim == worker,
                    RUNS.c.claimed_at < now - timedelta(seconds=lease_s),
                ),
            )
            .values(claim=worker, claimed_at=now)
        )
        return bool(result.rowcount)


async def release(engine: AsyncEngine, run_id: int, worker: str) -> bool:
    """Give a claim back before its lease runs out (the worker stops without deriving)."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.claim == worker, RUNS.c.status == "published")
            .values(claim=None, claimed_at=None)
        )
        return bool(result.rowcount)


_TRUNCATED: Final = "replace_truncated"
"""Kept beside the options in their JSON column (`RunOptions.from_json` ignores it): the
coordination records' codec stays as it is, and no column is added to an existing table."""


async def note_truncated(engine: AsyncEngine, run_id: int, worker: str) -> bool:
    """Record that the `--replace` truncations of a run never derived have been sent
    (acknowledged by the broker)."""
    async with engine.begin() as conn:
        raw = await conn.scalar(
            sa.select(RUNS.c.options).where(
                RUNS.c.id == run_id, RUNS.c.claim == worker, RUNS.c.status == "published"
            )
        )
        if raw is None:
            return False
        noted = {**_json(raw), _TRUNCATED: True}
        result = await conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.claim == worker, RUNS.c.status == "published")
            .values(options=orjson.dumps(noted).decode())
        )
        return bool(result.rowcount)


async def truncated(engine: AsyncEngine, run: ImportRun) -> bool:
    """True when an earlier attempt at deriving `run`, never derived before, sent its
    truncations (`note_truncated`). A run derived again after the broker lost its changes
    (`derive_again`, which keeps its summary) truncates again: those may have been lost too."""
    if run.status != "published" or run.summary is not None:
        return False
    async with engine.connect() as conn:
        raw = await conn.scalar(sa.select(RUNS.c.options).where(RUNS.c.id == run.id))
    return bool(_json(raw).get(_TRUNCATED))


async def mark_derived(
    engine: AsyncEngine,
    run_id: int,
    worker: str,
    *,
    summary: DerivationSummary,
    changes_end: dict[int, int],
) -> bool:
    """Record the derivation of a run by the worker that holds its claim; False (nothing
    recorded) when another worker took the claim over."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.status == "published", RUNS.c.claim == worker)
            .values(
                status="derived",
                counters=codec.encode_summary(summary).decode(),
                changes_end=orjson.dumps({str(p): o for p, o in changes_end.items()}).decode(),
                derived_at=_now(),
            )
        )
        return bool(result.rowcount)


async def derive_again(engine: AsyncEngine, run_id: int) -> bool:
    """Put a derived run back in line for its derivation (the broker lost its changes)."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.status == "derived")
            .values(status="published", claim=None, claimed_at=None, derived_at=None)
        )
        return bool(result.rowcount)


async def applied_by_sink(engine: AsyncEngine, run: ImportRun, group: str, topic: str) -> bool:
    """True when the sink's stored positions have passed every change of this run."""
    if run.status != "derived":
        return False
    return reached(await stored_positions(engine, group, topic), run.changes_end)


def reached(positions: dict[int, int], ends: dict[int, int]) -> bool:
    return all(positions.get(p, 0) >= end for p, end in ends.items())


async def latest_derived_before(conn: AsyncConnection, run_id: int) -> ImportRun | None:
    """The newest run before `run_id` whose derivation completed."""
    stmt = (
        sa.select(RUNS)
        .where(RUNS.c.id < run_id, RUNS.c.status == "derived")
        .order_by(RUNS.c.id.desc())
        .limit(1)
    )
    row = (await conn.execute(stmt)).first()
    return from_row(row) if row is not None else None


async def derived_just_before(conn: AsyncConnection, run_id: int) -> ImportRun | None:
    """The run directly before `run_id` when its derivation completed, else None: only then
    are its documents in the store, and no run between moved them. Ids may skip (a sequence
    does not give back a number a failed registration took), so "directly" is asked, not
    computed."""
    previous = await latest_derived_before(conn, run_id)
    if previous is None:
        return None
    between = await conn.scalar(
        sa.select(RUNS.c.id).where(RUNS.c.id > previous.id, RUNS.c.id < run_id).limit(1)
    )
    return previous if between is None else None


async def latest(engine: AsyncEngine) -> ImportRun | None:
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(RUNS).order_by(RUNS.c.id.desc()).limit(1))).first()
    return from_row(row) if row is not None else None


async def heartbeat(engine: AsyncEngine, run_id: int, worker: str) -> bool:
    """Renew a derivation claim, so that a long derivation is not taken over; False when the
    claim is no longer this worker's, or the run was superseded."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.claim == worker, RUNS.c.status == "published")
            .values(claimed_at=_now())
        )
        return bool(result.rowcount)


async def stored_positions(engine: AsyncEngine, group: str, topic: str) -> dict[int, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(OFFSETS.c.partition, OFFSETS.c.next_offset).where(
                OFFSETS.c.consumer_group == group, OFFSETS.c.topic == topic
            )
        )
        return {int(p): int(o) for p, o in rows.all()}
