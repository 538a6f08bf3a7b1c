"""The `publish` stage, wired: the one path by which both `publish` and `import-chat` publish
an export, with the same retries (database and broker outages are waited out up to the
database port's deadline) and the same backpressure (sending holds back while the processor
group falls behind, and stops waiting for a processor that is not running)."""

from __future__ import annotations

import contextlib
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
from producers import live_mirror
from producers.amendment import Amendment
from producers.export_reader import ExportSource
from producers.publisher import Publisher, PublishReport


def _utc(ns: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


PROCESSOR_BEHIND = 15_000
"""Documents the processor may be behind the publisher, per table."""


async def open_run(
    live: Settings, db: Database, export: ExportSource, options: import_runs.RunOptions
) -> int:
    """Create the topics (waiting for the broker) and register a new run for `export`.

    UsageError (exit 2, nothing written) when this database follows a live deployment
    (`follow`) whose published state is newer than the export's snapshot: the export's older
    versions would replace newer ones (the later state wins, SPEC §5)."""
    followed = await db.run(live_mirror.followed_up_to)
    if followed is not None and followed[1] > (export.snapshot_ms or 0) * 1_000_000:
        deployment, published_ns = followed
        raise UsageError(
            f"{export.path}: this database follows {deployment}, whose state published here"
            f" ({_utc(published_ns)}) is newer than this export's snapshot"
            f" ({_utc((export.snapshot_ms or 0) * 1_000_000)}): its older versions would"
            " replace newer ones; nothing was written (import a newer export, or --replace"
            " into a database that does not follow one)"
        )
    await prepare_topics_waiting(live, db)
    return await db.run(
        import_runs.register, source=str(export.path), sha256=export.sha256(), options=options
    )


async def publish_run(
    live: Settings,
    db: Database,
    export: ExportSource,
    run_id: int,
    options: import_runs.RunOptions,
    *,
    progress: ProgressCallback | None = None,
    applied: Mapping[str, int] | None = None,
) -> PublishReport:
    """Publish `export` as run `run_id` (`Publisher.publish`; `applied`: publish it again after
    the broker lost documents); a broker that lost acknowledged records is RuntimeFailure."""
    async with _publisher(live, db, options, progress) as publisher:
        return await publisher.publish(export, run_id, applied=applied)


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
