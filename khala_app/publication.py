"""The `publish` stage, wired: the one path by which both `publish` and `import-chat` publish
an export, with the same retries (database and broker outages are waited out up to the
database port's deadline) and the same backpressure (sending holds back while the processor
group falls behind, and stops waiting for a processor that is not running)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping

from aiokafka.errors import OutOfOrderSequenceNumber, UnknownProducerId

from khala_app.topic_owner import prepare_topics_waiting
from khala_stream import import_runs
from khala_stream.backpressure import Backpressure
from khala_stream.broker.clients import make_producer
from khala_stream.config import Settings
from khala_stream.contract import Topics
from khala_stream.contract.runs import PublishManifest
from khala_stream.db.port import Database
from khala_stream.errors import RuntimeFailure, UsageError
from khala_stream.progress import ProgressCallback
from producers import later_state
from producers.amendment import Amendment
from producers.export_reader import ExportSource
from producers.publisher import InWriting, Publisher, PublishReport

PROCESSOR_BEHIND = 15_000
"""Documents the processor may be behind the publisher, per table."""


async def open_run(
    live: Settings, db: Database, export: ExportSource, options: import_runs.RunOptions
) -> int:
    """Create the topics (waiting for the broker) and register a new run for `export`.

    When this database follows a deployment whose published state is newer than the export,
    the run keeps the followed tables as they are (`producers/later_state.py`), so it is
    registered right after the newest run once that one is derived; waited for up to the
    database's deadline (RuntimeFailure, nothing written, when it is not derived by then)."""
    await prepare_topics_waiting(live, db)
    snapshot_ms = export.snapshot_ms or 0
    source, sha256 = str(export.path), export.sha256()
    deadline = time.monotonic() + db.deadline_s
    if await db.run(later_state.followed_after, snapshot_ms) is None:
        return await db.run(import_runs.register, source=source, sha256=sha256, options=options)
    if options.replace:
        raise UsageError(
            f"{export.path}: --replace of an export older than the state of the deployment"
            " this database follows: follow would publish that state over it again; nothing"
            " was written (a merge import keeps the followed tables and reads the others)"
        )
    # The followed state only moves forward: once newer than the export, it stays newer.
    while (newest := await db.run(import_runs.latest)) is not None:
        if newest.status == "derived":
            run_id = await db.run(
                import_runs.register_after, newest.id, source=source, sha256=sha256, options=options
            )
            if run_id is not None:
                return run_id
            continue  # another run came first: wait for it in turn
        if time.monotonic() > deadline:
            raise RuntimeFailure(
                f"{export.path}: this export is older than the state of the deployment this"
                f" database follows, so its run keeps that state, which run {newest.id}"
                f" ({newest.status}) holds; it is not derived after {db.deadline_s:.0f} s:"
                " nothing was written; rerun once it is (is the process stage running?)"
            )
        await asyncio.sleep(_POLL_S)
    return await db.run(import_runs.register, source=source, sha256=sha256, options=options)


_POLL_S = 0.5


async def publish_run(
    live: Settings,
    db: Database,
    export: ExportSource,
    run_id: int,
    options: import_runs.RunOptions,
    *,
    progress: ProgressCallback | None = None,
    applied: Mapping[str, int] | None = None,
    followed_state: bool = False,
    writing: InWriting | None = None,
) -> PublishReport:
    """Publish `export` as run `run_id` (`Publisher.publish`; `applied`: publish it again after
    the broker lost documents); a broker that lost acknowledged records is RuntimeFailure.
    `followed_state`: the export is the followed deployment's state (`follow`), never older
    than itself (its time in milliseconds can fall before the last state's in nanoseconds);
    `writing`: the export is still being written (`Publisher.publish`)."""
    later = None
    if not (options.replace or followed_state):  # --replace: refused when older (`open_run`)
        later = await db.run(later_state.later_state, run_id, export.snapshot_ms or 0)
    async with _publisher(live, db, options, progress) as publisher:
        return await publisher.publish(
            export, run_id, applied=applied, later=later, writing=writing
        )


async def publish_amendment_run(
    live: Settings,
    db: Database,
    base: PublishManifest,
    amendments: Mapping[str, Amendment],
    run_id: int,
    options: import_runs.RunOptions,
    *,
    sha256: str,
    snapshot_ms: int,
) -> PublishReport:
    """Publish run `run_id` as run `base` amended (`Publisher.publish_amendment`)."""
    async with _publisher(live, db, options, None) as publisher:
        return await publisher.publish_amendment(
            base, amendments, run_id, sha256=sha256, snapshot_ms=snapshot_ms
        )


@contextlib.asynccontextmanager
async def _publisher(
    live: Settings,
    db: Database,
    options: import_runs.RunOptions,
    progress: ProgressCallback | None,
) -> AsyncIterator[Publisher]:
    topics = Topics(live.topic_prefix)
    # A producer of its own each time: after the broker lost records, an idempotent producer's
    # sequence numbers run ahead of the broker's and every send is refused.
    producer = make_producer(live.kafka)
    await producer.start()
    try:
        yield Publisher(
            producer=producer,
            db=db,
            topics=topics,
            incremental=options.incremental,
            carry_unchanged=not options.replace,
            skip_blueprints=options.skip_blueprints,
            progress=progress,
            backpressure=Backpressure(
                db.engine, topics.processor_group, limit=PROCESSOR_BEHIND, deadline_s=db.deadline_s
            ),
        )
    except (OutOfOrderSequenceNumber, UnknownProducerId) as exc:
        raise RuntimeFailure(
            "the broker lost messages it had acknowledged while the export was being"
            f" published (was it restarted?): {exc}; rerun to publish them again"
        ) from exc
    finally:
        await producer.stop()
