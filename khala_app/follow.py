"""`khala-stream follow`: a live deployment's snapshot, then its changes, into the topics.

The steps, each resumable where it stopped (`producers/live_mirror.py` keeps the position
with the documents it covers):

1. Ask the deployment for its tables (a refused key is DeployKeyError, exit 2, before
   anything is written).
2. First time only: pin a snapshot (`list_snapshot` without a table) and walk each followed
   table in pages; a snapshot the source no longer serves is walked again from a new one.
   The snapshot's state is published as it is walked (`_SnapshotPublication`): the tables
   are walked largest first, and each is published once walked while the next ones are.
3. Publish the state as a newer export of the deployment (a merge import, SPEC §5): the
   mirror written as a folder export, in `_creationTime`, `_id` order, through the one publish
   path (`khala_app/publication.py`), so `process` and `sink` derive and write it as they do
   any export. The state is marked published only after the broker acknowledged it. A later
   step is published as an amendment of the run before instead, once that run is derived:
   only what changed, with the lines of the rest kept (`producers/amendment.py`), so a
   step costs what it changed, not the size of the state.
4. Poll `document_deltas` from the stored cursor; each page goes into the mirror with the
   cursor after it (a cursor the source no longer serves: a new snapshot, step 2). When the
   source has nothing more (`hasMore` false) and something followed changed, publish again
   (3). A deletion is a tombstone: the document leaves the state, so it
   is reported as gone, and deleted from the Laravel tables only with --propagate-deletes.

With `until_caught_up` the command returns once the state it has read is published and the
source reported no more changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from khala_app.publication import publish_amendment_run, publish_run
from khala_app.topic_owner import prepare_topics_waiting
from khala_stream import import_runs, metrics
from khala_stream.broker.clients import broker_session
from khala_stream.config import Settings, is_http_url
from khala_stream.contract import Topics
from khala_stream.contract.tables import CHAT_TABLES, SOURCE_TABLES
from khala_stream.db.port import Database, open_database
from khala_stream.errors import DeployKeyError, UsageError
from khala_stream.processes import pid_alive
from producers import live_mirror
from producers.amendment import amendment_sha256
from producers.export_reader import folder_in_writing, open_export
from producers.live_api import Cursor, SnapshotPage
from producers.live_client import CursorExpired, LiveClient, SnapshotExpired
from producers.live_mirror import FollowState
from producers.publisher import PublishReport
from producers.table_spool import TableSpool

logger = logging.getLogger(__name__)
# The line per publication shown without -v, as the stages' status lines are.
_status = logging.getLogger("khala_stream.status")

_WALK_ORDER: Final = ("messages", "receipts", "runs", "threads", "blueprints", "users")
"""The order a snapshot's tables are walked in: a chat deployment's largest first, so that
the others are walked while it is (its walk and its publication are the longest)."""
assert sorted(_WALK_ORDER) == sorted(SOURCE_TABLES)


def _in_walk_order(tables: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(tables, key=_WALK_ORDER.index))


_STATUS_EVERY_S = 5.0
_PAGES_PER_PUBLISH = 50
"""Delta pages read at most before the state is published even though more are waiting."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FollowOptions:
    deployment: str
    tables: tuple[str, ...] = SOURCE_TABLES
    propagate_deletes: bool = False
    until_caught_up: bool = False
    poll_interval_s: float = 1.0


@dataclass(slots=True)
class FollowReport:
    """What one `follow` command did."""

    deployment: str
    tables: list[str] = field(default_factory=list)
    snapshot_documents: Counter[str] = field(default_factory=Counter)
    snapshot_restarts: int = 0
    changed: Counter[str] = field(default_factory=Counter)
    deleted: Counter[str] = field(default_factory=Counter)
    runs: list[int] = field(default_factory=list)
    published: Counter[str] = field(default_factory=Counter)
    cursor: Any = None
    state_ns: int = 0
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "tables": self.tables,
            "snapshot_documents": dict(self.snapshot_documents),
            "snapshot_restarts": self.snapshot_restarts,
            "changed": dict(self.changed),
            "deleted": dict(self.deleted),
            "runs": self.runs,
            "published": dict(self.published),
            "cursor": self.cursor,
            "state_ns": self.state_ns,
            "retries": self.retries,
        }

    def lines(self, propagate_deletes: bool) -> list[str]:
        out = [f"follow {self.deployment}: tables {' '.join(self.tables) or 'none'}"]
        if self.snapshot_documents or self.snapshot_restarts:
            counts = " ".join(f"{t}={n}" for t, n in sorted(self.snapshot_documents.items()))
            out.append(
                f"  snapshot: {counts or 'no documents'}"
                + (f" (restarted {self.snapshot_restarts}x)" if self.snapshot_restarts else "")
            )
        changed = " ".join(f"{t}={n}" for t, n in sorted(self.changed.items()))
        out.append(f"  changes: {changed or 'none'}")
        if self.deleted:
            deleted = " ".join(f"{t}={n}" for t, n in sorted(self.deleted.items()))
            what = "propagated" if propagate_deletes else "reported, not propagated"
            out.append(f"  deleted at the source: {deleted} ({what})")
        runs = " ".join(str(r) for r in self.runs)
        out.append(f"  runs published: {runs or 'none'}")
        out.append(f"  cursor: {self.cursor}")
        return out


def _check_deployment(url: str) -> str:
    if not is_http_url(url) or urlsplit(url).username is not None:
        raise UsageError(f"--deployment must be an http(s) URL without credentials, not {url!r}")
    return url.rstrip("/")


async def follow(
    settings: Settings,
    options: FollowOptions,
    *,
    on_published: Callable[[FollowReport], None] | None = None,
) -> FollowReport:
    """Run `follow` (module docstring); returns what it did when caught up (with
    `until_caught_up`), else runs until cancelled."""
    deployment = _check_deployment(options.deployment)
    key = settings.khala_deploy_key
    if key is None:
        raise DeployKeyError("follow needs KHALA_DEPLOY_KEY in the environment")
    unknown = sorted(set(options.tables) - set(SOURCE_TABLES))
    if unknown:
        raise UsageError(
            f"--tables: not a source table: {', '.join(unknown)}"
            f" (choose from {', '.join(SOURCE_TABLES)})"
        )
    report = FollowReport(deployment=deployment)
    async with LiveClient(
        base_url=deployment, deploy_key=key.reveal(), deadline_s=settings.retry_deadline_s
    ) as client:
        present = set(await client.tables())
        followed: list[str] = [t for t in SOURCE_TABLES if t in options.tables and t in present]
        report.tables = followed
        if not CHAT_TABLES & set(followed):
            raise UsageError(
                f"{deployment} has none of the chat tables to follow"
                f" ({', '.join(sorted(CHAT_TABLES & set(options.tables)))})"
            )
        async with open_database(settings.database_url, deadline_s=settings.retry_deadline_s) as db:
            found = await db.run(live_mirror.load_state, deployment)
            async with broker_session(settings) as live:
                await prepare_topics_waiting(live, db)
                while True:
                    began = time.monotonic()
                    state = await _snapshot(client, db, live, followed, found, options, report)
                    if report.snapshot_documents:
                        _status.info(
                            "follow: snapshot walked: documents=%d seconds=%.2f",
                            sum(report.snapshot_documents.values()),
                            time.monotonic() - began,
                        )
                    try:
                        await _follow_deltas(client, db, live, followed, state, options, report,
                                             on_published)  # fmt: skip
                        break
                    except CursorExpired as exc:
                        logger.warning(
                            "follow: changes after cursor=%s no longer kept; new snapshot",
                            exc.cursor,
                        )
                        report.snapshot_restarts += 1
                        report.snapshot_documents.clear()
                        found = None
        report.retries = client.retries
    return report


async def _snapshot(
    client: LiveClient,
    db: Database,
    live: Settings,
    followed: Sequence[str],
    state: FollowState | None,
    options: FollowOptions,
    report: FollowReport,
) -> FollowState:
    """Walk the snapshot (again, from where it stopped), publishing it on the way when it can
    be; the state once every table is done."""
    deployment = report.deployment
    while state is None or state.phase == "snapshot":
        if state is None:
            pinned = await client.snapshot_page(None, snapshot=None, cursor=None)
            state = await db.run(live_mirror.start_snapshot, deployment, pinned.snapshot)
            logger.info("follow: snapshot=%s pinned", pinned.snapshot)
        snapshot = state.snapshot
        publication = await _SnapshotPublication.start(db, live, followed, state, options)
        try:
            await _walk(client, db, state, followed, publication, report)
            state = await db.run(live_mirror.finish_snapshot, deployment)
            if publication is not None:
                state = await publication.finish(state, report)
        except SnapshotExpired:
            logger.warning("follow: snapshot=%s no longer served; walking a new one",
                           snapshot)  # fmt: skip
            report.snapshot_restarts += 1
            report.snapshot_documents.clear()
            state = None
        finally:
            if publication is not None:
                await publication.close()
    return state


async def _walk(
    client: LiveClient,
    db: Database,
    state: FollowState,
    followed: Sequence[str],
    publication: _SnapshotPublication | None,
    report: FollowReport,
) -> None:
    """Walk the tables of `followed` (from where they stopped), the largest first, each
    handed to `publication` once walked. One at a time: a second walker only slowed the
    first, the largest, whose walk is what the publication waits for (bench/README.md)."""
    for table in _in_walk_order(followed):
        fresh = table not in state.table_cursors  # none of its pages stored yet
        spool = publication.spool(table) if publication is not None and fresh else None
        await _walk_table(client, db, state, table, report, spool)
        if publication is not None:
            publication.walked(table)


async def _walk_table(
    client: LiveClient,
    db: Database,
    state: FollowState,
    table: str,
    report: FollowReport,
    spool: TableSpool | None,
) -> None:
    """Walk `table`'s snapshot from where it stopped, each page into the mirror with the
    cursor after it, and into `spool` as stored. The next page is asked for while one is
    stored: the source and the database work at the same time, and the position still moves
    only with the page."""
    cursor, done = state.table_cursors.get(table, (None, False))
    deployment, snapshot = state.deployment, state.snapshot

    def ask(after: Cursor | None) -> asyncio.Future[SnapshotPage]:
        return asyncio.ensure_future(client.snapshot_page(table, snapshot=snapshot, cursor=after))

    asked = None if done else ask(cursor)
    try:
        while asked is not None:
            page = await asked
            if page.snapshot != snapshot:
                raise SnapshotExpired(snapshot)  # the source moved it: again
            cursor, done = page.cursor, not page.has_more
            asked = None if done else ask(cursor)
            copied = await db.run(
                live_mirror.apply_snapshot_page, deployment, table, page.values, cursor, done
            )
            if spool is not None and copied is not None:
                spool.add(copied)
            elif spool is not None:
                spool.give_up()
            report.snapshot_documents[table] += len(page.values)
    finally:
        if asked is not None:  # this page failed to be stored: the next one is not wanted
            asked.cancel()
            await asyncio.gather(asked, return_exceptions=True)


async def _follow_deltas(
    client: LiveClient,
    db: Database,
    live: Settings,
    followed: Sequence[str],
    state: FollowState,
    options: FollowOptions,
    report: FollowReport,
    on_published: Callable[[FollowReport], None] | None,
) -> None:
    pages = 0
    next_status = time.monotonic() + _STATUS_EVERY_S
    metrics.source_position(newest_ns=state.state_ns, published_ns=state.published_ns)
    freshness = _Freshness(db, Topics(live.topic_prefix))
    while True:
        caught_up = False
        assert state.delta_cursor is not None
        while not caught_up and pages < _PAGES_PER_PUBLISH:
            page = await client.deltas(state.delta_cursor)
            state, effect = await db.run(
                live_mirror.apply_delta_page, state.deployment, page.values, page.cursor, followed
            )
            report.changed.update(effect.changed)
            report.deleted.update(effect.deleted)
            metrics.source_position(newest_ns=state.state_ns)
            caught_up = not page.has_more
            pages += 1
        report.cursor, report.state_ns = state.delta_cursor, state.state_ns
        # A state older than an export imported since is not published until it is newer
        # (the later state wins, SPEC §5); once caught up the source's state is the latest.
        older = state.state_ns < await db.run(live_mirror.newest_export_ms) * 1_000_000
        if state.unpublished and (caught_up or not older):
            pending = state.pending_ns
            after = await _publish(db, live, followed, state, options, report)
            if after is not None:
                state = after
                metrics.source_position(published_ns=state.published_ns)
                if state.published_run is not None:
                    freshness.published(state.published_run, pending)
                if on_published is not None:
                    on_published(report)
        await freshness.check()
        pages = 0
        if caught_up and options.until_caught_up:
            return
        if time.monotonic() >= next_status:
            # A line every few seconds without -v, as the stages do: silence means stopped.
            next_status = time.monotonic() + _STATUS_EVERY_S
            behind = (state.state_ns - state.published_ns) / 1e9 if state.unpublished else 0.0
            _status.info(
                "follow: cursor=%s behind=%.1fs changes=%d deleted=%d runs=%d retries=%d",
                state.delta_cursor,
                max(0.0, behind),
                sum(report.changed.values()),
                sum(report.deleted.values()),
                len(report.runs),
                client.retries,
            )
        if caught_up:
            await asyncio.sleep(options.poll_interval_s)


class _Freshness:
    """End-to-end freshness: when the sink has committed every row of the last run published,
    the oldest change it carried has reached Laravel; measured against the wall clock (the
    source's `_ts` is the deployment's clock: keep both on NTP), once per run, so its
    precision is the poll interval. A run superseded before it was derived hands its oldest
    change on to the run that superseded it."""

    def __init__(self, db: Database, topics: Topics) -> None:
        self._db = db
        self._topics = topics
        self._waiting: tuple[int, int] | None = None  # run, oldest change (ns)

    def published(self, run_id: int, oldest_ns: int | None) -> None:
        if self._waiting is not None:
            older = self._waiting[1]
            oldest_ns = older if oldest_ns is None else min(older, oldest_ns)
        if oldest_ns is not None:
            self._waiting = (run_id, oldest_ns)

    async def check(self) -> None:
        if self._waiting is None:
            return
        run_id, oldest_ns = self._waiting
        run = await self._db.run(import_runs.load, run_id)
        if run is None or not await self._db.run(
            import_runs.applied_by_sink, run, self._topics.sink_group, self._topics.changes
        ):
            return
        seconds = max(0.0, time.time() - oldest_ns / 1e9)
        self._waiting = None
        metrics.source_freshness(seconds)
        await self._db.run(live_mirror.record_freshness, run_id, seconds)
        logger.info("follow: run=%d freshness_s=%.2f", run_id, seconds)


_SPOOL: Final = "khala-follow-"


def _spool_folder() -> Path:
    """A fresh temporary folder for one publication's state, named after this process; first
    the folders of processes that no longer run are removed (a follow killed with -9 cannot
    remove its own, and each holds a copy of the followed state)."""
    for old in Path(tempfile.gettempdir()).glob(f"{_SPOOL}*-*"):
        pid = old.name[len(_SPOOL) :].split("-", 1)[0]
        with contextlib.suppress(OSError):
            mine = old.lstat().st_uid == os.getuid() and old.is_dir() and not old.is_symlink()
            if mine and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SPOOL}{os.getpid()}-"))


async def _publish(
    db: Database,
    live: Settings,
    followed: Sequence[str],
    state: FollowState,
    options: FollowOptions,
    report: FollowReport,
) -> FollowState | None:
    """Publish the mirror at `state` as one run (a newer export of the deployment): as an
    amendment of the run before when it can be one, else whole. None: not now, the run
    before is still to be derived (an amendment waits for it; a second whole state would only
    supersede it)."""
    run_options = _run_options(options)
    base = await _amendable(db, state, run_options, followed)
    if base == "wait" and not options.until_caught_up:
        return None
    published = None
    if isinstance(base, import_runs.ImportRun):
        published = await _publish_amendment(db, live, followed, state, base, run_options)
    if published is None:
        published = await _publish_whole(db, live, followed, state, run_options)
    report.runs.append(published.run_id)
    report.published.update(published.published)
    after = await db.run(live_mirror.load_state, state.deployment)
    assert after is not None
    return after


def _run_options(options: FollowOptions) -> import_runs.RunOptions:
    return import_runs.RunOptions(
        propagate_deletes=options.propagate_deletes,
        # Left out by --tables: as --skip-blueprints. Missing at the source: as an export
        # without the table (the derivation reads none).
        skip_blueprints="blueprints" not in options.tables,
        incremental=True,
    )


async def _amendable(
    db: Database, state: FollowState, run_options: import_runs.RunOptions, followed: Sequence[str]
) -> import_runs.ImportRun | str:
    """The run this state can be published as an amendment of (`producers/amendment.py`):
    the last one published from the mirror, the newest of the database, derived, with these
    options and tables and no line its reader refused. "wait" while that run is still to be
    derived, "whole" when there is none."""
    latest = await db.run(import_runs.latest)
    if (
        latest is None
        or state.lines_run is None
        or latest.id != state.lines_run
        or latest.options != run_options
        or latest.manifest is None
        or sorted(latest.manifest.tables) != sorted(followed)
        or any(latest.manifest.rejected.values())
    ):
        return "whole"
    if latest.status == "published":
        return "wait"
    return latest if latest.status == "derived" else "whole"


async def _publish_amendment(
    db: Database,
    live: Settings,
    followed: Sequence[str],
    state: FollowState,
    base: import_runs.ImportRun,
    run_options: import_runs.RunOptions,
) -> PublishReport | None:
    """Publish the changes since `base` as its amendment; None when they cannot be one."""
    assert base.manifest is not None
    plan, reason = await db.run(live_mirror.plan_amendment, followed, state.published_version)
    if plan is None:
        logger.info("follow: the state is published whole: %s", reason)
        return None
    sha256 = amendment_sha256(base.id, plan)
    source = live_mirror.run_source(state.deployment, state.delta_cursor)
    run_id = await db.run(import_runs.register, source=source, sha256=sha256, options=run_options)
    if run_id != base.id + 1:
        # Another import registered a run since `base`: its documents are no longer the
        # store's latest (this run, superseded by the next one, stays unpublished).
        logger.warning("follow: run %d is not the one after run %d; the state is published"
                       " whole", run_id, base.id)  # fmt: skip
        return None
    started = time.monotonic()
    published = await publish_amendment_run(
        live, db, base.manifest, plan, run_id, run_options,
        sha256=sha256, snapshot_ms=state.state_ns // 1_000_000,
    )  # fmt: skip
    new_lines = {table: amendment.new_lines for table, amendment in plan.items()}
    await db.run(
        live_mirror.mark_published, state.deployment, state.version, state.state_ns, run_id,
        tables=followed, new_lines=new_lines,
    )  # fmt: skip
    _status.info(
        "follow: run=%d version=%d cursor=%s amends=%d published=%s seconds=%.2f",
        run_id,
        state.version,
        state.delta_cursor,
        base.id,
        dict(published.published),
        time.monotonic() - started,
    )
    return published


async def _publish_whole(
    db: Database,
    live: Settings,
    followed: Sequence[str],
    state: FollowState,
    run_options: import_runs.RunOptions,
) -> PublishReport:
    """Publish the mirror at `state` whole, written as a folder export."""
    folder = _spool_folder()
    try:
        began = time.monotonic()
        await db.run(live_mirror.write_folder, followed, folder, state.state_ns)
        logger.info("follow: state written: seconds=%.2f", time.monotonic() - began)
        with open_export(folder, max_entry_bytes=1 << 62, max_ratio=1e12,
                         max_total_bytes=1 << 62) as export:  # fmt: skip
            source = live_mirror.run_source(state.deployment, state.delta_cursor)
            run_id = await db.run(
                import_runs.register, source=source, sha256=export.sha256(), options=run_options
            )
            started = time.monotonic()
            published = await publish_run(
                live, db, export, run_id, run_options, followed_state=True
            )
        await db.run(
            live_mirror.mark_published, state.deployment, state.version, state.state_ns, run_id,
            tables=followed,
        )  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _status.info(
        "follow: run=%d version=%d cursor=%s published=%s seconds=%.2f",
        run_id,
        state.version,
        state.delta_cursor,
        dict(published.published),
        time.monotonic() - started,
    )
    return published


class _SnapshotPublication:
    """A snapshot's state published as it is walked: one run, its tables in the order their
    walks end (`producers.publisher.InWriting`), each written out as a folder export's table
    file and published while the others are walked. The state is marked published (step 3)
    only when every table is walked and the broker acknowledged the run: a follow stopped
    before then publishes the state whole when it resumes, and the run left behind is
    superseded."""

    def __init__(
        self,
        db: Database,
        live: Settings,
        followed: Sequence[str],
        state: FollowState,
        run_options: import_runs.RunOptions,
        run_id: int,
        sha256: str,
    ) -> None:
        self._db = db
        self._deployment = state.deployment
        self._followed = tuple(followed)
        self._state_ns = state.snapshot_ns
        self._run_id = run_id
        self._walked: asyncio.Queue[str] = asyncio.Queue()
        self._folder = _spool_folder()
        self._spools: dict[str, TableSpool] = {}
        self._walks = _spool_folder()  # the spools: not in the export's folder
        self._began = time.monotonic()
        export = folder_in_writing(
            self._folder,
            self._followed,
            snapshot_ms=self._state_ns // 1_000_000,
            sha256=sha256,
        )
        self._task = asyncio.ensure_future(
            publish_run(live, db, export, run_id, run_options, followed_state=True, writing=self)
        )

    @classmethod
    async def start(
        cls,
        db: Database,
        live: Settings,
        followed: Sequence[str],
        state: FollowState,
        options: FollowOptions,
    ) -> _SnapshotPublication | None:
        """Register the run and start publishing; None when the state cannot go out as it is
        walked: its snapshot position carries no source time, or an export imported since is
        newer (the state then waits for deltas that make it newer, step 4)."""
        newest_export_ns = await db.run(live_mirror.newest_export_ms) * 1_000_000
        if state.snapshot_ns == 0 or state.snapshot_ns < newest_export_ns:
            return None
        run_options = _run_options(options)
        source = live_mirror.run_source(state.deployment, state.snapshot)
        # Named by its snapshot, not its bytes: they are not all known when the first go out.
        sha256 = hashlib.sha256(source.encode()).hexdigest()
        run_id = await db.run(
            import_runs.register, source=source, sha256=sha256, options=run_options
        )
        return cls(db, live, followed, state, run_options, run_id, sha256)

    async def next_written(self, tables: Sequence[str]) -> str:
        """`InWriting`: a table not followed at once, else the next one walked, written out."""
        for table in tables:
            if table not in self._followed:
                return table  # the export has no such table
        table = await self._walked.get()
        await self._db.run(
            live_mirror.write_folder, [table], self._folder, self._state_ns, self._spools
        )
        if spool := self._spools.pop(table, None):
            spool.close()
        return table

    def spool(self, table: str) -> TableSpool:
        """Where `table`'s walk, started from its first page, keeps what it stores, for
        `write_folder` to write the table from."""
        spool = self._spools[table] = TableSpool(self._walks / f"{table}.spool")
        return spool

    def walked(self, table: str) -> None:
        """`table`'s walk is done: it may be published. Raises what stopped the publication."""
        if self._task.done():
            self._task.result()
        self._walked.put_nowait(table)

    async def finish(self, state: FollowState, report: FollowReport) -> FollowState:
        """Every table walked (`state`, from `finish_snapshot`): once the broker has the run,
        the state is published; the state after."""
        published = await self._task
        await self._db.run(
            live_mirror.mark_published, self._deployment, state.version, state.state_ns,
            self._run_id, tables=self._followed,
        )  # fmt: skip
        report.runs.append(self._run_id)
        report.published.update(published.published)
        _status.info(
            "follow: run=%d version=%d snapshot=%s published=%s seconds=%.2f (as walked)",
            self._run_id,
            state.version,
            state.snapshot,
            dict(published.published),
            time.monotonic() - self._began,
        )
        after = await self._db.run(live_mirror.load_state, self._deployment)
        assert after is not None
        return after

    async def close(self) -> None:
        """Stop publishing if it has not finished, and remove the written tables."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        for spool in self._spools.values():
            spool.close()
        shutil.rmtree(self._walks, ignore_errors=True)
        shutil.rmtree(self._folder, ignore_errors=True)
