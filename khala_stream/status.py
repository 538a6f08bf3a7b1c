"""Where each import run stands, and what each stage is waiting for (`khala-stream status`).

Read from the database (runs, the store's per-run counts, the groups' stored positions) and,
when given, the broker's end offsets: a stage's own backlog (documents or changes on a topic
that its group has not applied yet) is only visible there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream import import_runs
from khala_stream.contract import Topics
from khala_stream.db.importer_tables import APPLIED, OFFSETS, RUNS
from khala_stream.runtime import Waiting

__all__ = ["RunStatus", "StageState", "Status", "read_status", "waiting_for_process"]

Phase = Literal["publishing", "published", "deriving", "derived", "applied", "superseded"]
_SHOWN_RUNS = 10


@dataclass(frozen=True, slots=True)
class RunStatus:
    id: int
    export_sha256: str
    phase: Phase
    published: dict[str, int]
    """Messages the publisher sent per source table (empty while publishing)."""
    stored: dict[str, int]
    """Of those, messages the processor has applied to the document store."""
    changes: int | None
    """Change messages the derivation sent (None before it is derived)."""
    applied: int | None
    """Of those, change messages the sink has applied."""
    waiting_for: str | None
    """`publish`, `process` or `sink`: the stage that has the run's next step; None when
    the run is done (applied, or superseded by a newer run)."""
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.id,
            "export_sha256": self.export_sha256,
            "phase": self.phase,
            "published": self.published,
            "stored": self.stored,
            "changes": self.changes,
            "applied": self.applied,
            "waiting_for": self.waiting_for,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class StageState:
    stage: str
    backlog: int | None
    """Messages on the stage's topics past its stored positions (None: broker not asked)."""
    waiting_for: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "backlog": self.backlog,
            "waiting_for": self.waiting_for,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Status:
    runs: list[RunStatus] = field(default_factory=list)
    stages: list[StageState] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": [r.to_json() for r in self.runs],
            "stages": [s.to_json() for s in self.stages],
        }

    def lines(self) -> list[str]:
        out = ["runs (newest first):"] if self.runs else ["no import run in this database"]
        for r in self.runs:
            published = sum(r.published.values())
            stored = sum(min(r.stored.get(t, 0), n) for t, n in r.published.items())
            parts = [f"run {r.id} ({r.export_sha256[:12]}): {r.phase}"]
            if r.published:
                parts.append(f"published {published} messages, {stored} stored")
            if r.changes is not None:
                parts.append(f"derived {r.changes} change messages, {r.applied} applied")
            line = ", ".join(parts)
            if r.waiting_for:
                line += f"; waiting for {r.waiting_for}: {r.reason}"
            out.append("  " + line)
        out.append("stages:")
        for s in self.stages:
            backlog = "" if s.backlog is None else f"{s.backlog} message(s) to read; "
            waits = f"waiting for {s.waiting_for}: " if s.waiting_for else ""
            out.append(f"  {s.stage}: {backlog}{waits}{s.reason}")
        return out


def _backlog(positions: Mapping[int, int], ends: Mapping[int, int]) -> int:
    return sum(max(0, end - positions.get(p, 0)) for p, end in ends.items())


async def read_status(
    engine: AsyncEngine,
    topics: Topics,
    ends: Mapping[str, Mapping[int, int]] | None = None,
) -> Status:
    """The newest runs and both stages. `ends`: topic -> partition -> end offset, from the
    broker (None when it was not asked)."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(sa.select(RUNS).order_by(RUNS.c.id.desc()).limit(_SHOWN_RUNS))
        ).all()
        counts = (
            await conn.execute(
                sa.select(APPLIED.c.run_id, APPLIED.c.source_table, APPLIED.c.applied).where(
                    APPLIED.c.run_id.in_([r.id for r in rows])
                )
            )
        ).all()
        offsets = (
            await conn.execute(
                sa.select(
                    OFFSETS.c.consumer_group,
                    OFFSETS.c.topic,
                    OFFSETS.c.partition,
                    OFFSETS.c.next_offset,
                )
            )
        ).all()
    stored: dict[int, dict[str, int]] = {}
    for run_id, table, n in counts:
        stored.setdefault(int(run_id), {})[table] = int(n)
    positions: dict[tuple[str, str], dict[int, int]] = {}
    for group, topic, partition, offset in offsets:
        positions.setdefault((group, topic), {})[int(partition)] = int(offset)
    sink_at = positions.get((topics.sink_group, topics.changes), {})
    runs = [_run_status(row, stored.get(int(row.id), {}), sink_at) for row in rows]
    return Status(runs=runs, stages=_stages(runs, topics, positions, ends))


def _run_status(row: sa.Row[Any], stored: dict[str, int], sink_at: dict[int, int]) -> RunStatus:
    run = import_runs.from_row(row)
    published: dict[str, int] = dict(run.manifest.published) if run.manifest else {}
    changes = applied = None
    waiting: str | None
    if run.status == "derived":
        changes = sum(run.changes_end.values())
        # Change messages of this run are not told apart from earlier runs' on the topic:
        # what the sink applied counts up to the run's acknowledged ends.
        applied = changes - _backlog(sink_at, run.changes_end)
    if run.status == "publishing":
        phase: Phase = "publishing"
        waiting, reason = "publish", "the export is being published (or its publisher stopped)"
    elif run.status == "published":
        missing = sum(max(0, n - stored.get(t, 0)) for t, n in published.items())
        if missing:
            phase, waiting = "published", "process"
            reason = f"{missing} published message(s) not in the document store yet"
        elif row.claim:
            phase, waiting, reason = "deriving", "process", "being derived by a processor"
        else:
            phase, waiting, reason = "published", "process", "every document stored; not derived"
    elif run.status == "derived":
        if applied == changes:
            phase, waiting, reason = "applied", None, "done"
        else:
            phase, waiting = "derived", "sink"
            reason = f"{(changes or 0) - (applied or 0)} change message(s) not applied yet"
    else:
        phase, waiting, reason = "superseded", None, "superseded by a newer run"
    return RunStatus(
        id=run.id,
        export_sha256=run.export_sha256,
        phase=phase,
        published=published,
        stored={t: n for t, n in stored.items()},
        changes=changes,
        applied=applied,
        waiting_for=waiting,
        reason=reason,
    )


def _stages(
    runs: list[RunStatus],
    topics: Topics,
    positions: dict[tuple[str, str], dict[int, int]],
    ends: Mapping[str, Mapping[int, int]] | None,
) -> list[StageState]:
    def backlog(group: str, names: list[str]) -> int | None:
        if ends is None:
            return None
        return sum(_backlog(positions.get((group, t), {}), ends.get(t, {})) for t in names)

    process_backlog = backlog(topics.processor_group, topics.sources)
    sink_backlog = backlog(topics.sink_group, [topics.changes])
    newest = runs[0] if runs else None
    stages = []
    for stage, own in (("process", process_backlog), ("sink", sink_backlog)):
        if own:
            stages.append(StageState(stage, own, None, "has work to do"))
        elif newest is not None and newest.waiting_for == stage:
            stages.append(StageState(stage, own, None, f"has run {newest.id} to do"))
        elif newest is not None and newest.waiting_for is not None:
            reason = f"run {newest.id}: {newest.reason}"
            stages.append(StageState(stage, own, newest.waiting_for, reason))
        else:
            stages.append(StageState(stage, own, None, "idle: nothing to do"))
    return stages


async def waiting_for_sink(engine: AsyncEngine, topics: Topics) -> Waiting | None:
    """What a processor that has nothing left to do leaves to another stage: the newest run's
    changes, derived and not all applied yet (the sink), or documents of it that never
    reached the store (the publisher)."""
    run = await import_runs.latest(engine)
    if run is None:
        return None
    if run.status == "publishing":
        return Waiting(
            "publish", f"run {run.id} is still being published (or its publisher stopped)"
        )
    if run.status == "published":
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(APPLIED.c.source_table, APPLIED.c.applied).where(
                    APPLIED.c.run_id == run.id
                )
            )
            stored = {t: int(n) for t, n in rows.all()}
        expected = run.manifest.published if run.manifest is not None else {}
        missing = sum(max(0, n - stored.get(t, 0)) for t, n in expected.items())
        if missing:
            reason = f"run {run.id}: {missing} published document(s) are not on the broker"
            return Waiting("publish", reason)
        return None
    if run.status != "derived":
        return None
    positions = await import_runs.stored_positions(engine, topics.sink_group, topics.changes)
    left = _backlog(positions, run.changes_end)
    if not left:
        return None
    return Waiting("sink", f"run {run.id}: {left} change message(s) derived, not applied yet")


async def waiting_for_process(engine: AsyncEngine) -> Waiting | None:
    """What a sink that has nothing left to do leaves to the processor (or the publisher)."""
    run = await import_runs.latest(engine)
    if run is None:
        return None
    if run.status == "publishing":
        return Waiting("publish", f"run {run.id} is still being published")
    if run.status == "published":
        return Waiting("process", f"run {run.id} is published and not derived yet")
    return None
