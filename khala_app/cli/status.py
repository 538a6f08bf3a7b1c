"""`khala-stream status`: per run, what is published, derived and applied, and what each stage
is waiting for (`khala_stream.status`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from khala_stream.config import Settings
from khala_stream.errors import RuntimeFailure

if TYPE_CHECKING:
    from khala_stream.contract import Topics
    from khala_stream.status import Status

logger = logging.getLogger(__name__)
_BROKER_S = 15.0  # how long the end offsets may take before backlogs are left out


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="per import run: published, derived, applied, and what each stage waits for",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=status)


def status(args: argparse.Namespace, settings: Settings) -> int:
    from khala_app.cli import run_async
    from khala_app.cli.operations import _print, _require_database

    _require_database(settings.database_url)
    found = run_async(_status(settings))
    _print(args.json, found.to_json(), found.lines())
    return 0


async def _status(settings: Settings) -> Status:
    from sqlalchemy.exc import DBAPIError

    from khala_stream.contract import Topics
    from khala_stream.db.engine import create_engine
    from khala_stream.status import read_status

    topics = Topics(settings.topic_prefix)
    ends = await _ends(settings, topics)
    engine = create_engine(settings.database_url)
    try:
        return await read_status(engine, topics, ends)
    except (DBAPIError, OSError) as exc:
        reason = getattr(exc, "orig", None) or exc
        raise RuntimeFailure(
            f"cannot read the import runs (is this the import's database?):"
            f" {type(reason).__name__}: {reason}"
        ) from exc
    finally:
        await engine.dispose()


async def _ends(settings: Settings, topics: Topics) -> Mapping[str, Mapping[int, int]] | None:
    """End offsets of the stages' topics; None (backlogs unknown) when the broker does not
    answer in time."""
    from khala_stream.broker.clients import broker_session, make_consumer
    from khala_stream.runtime import end_offsets

    try:
        async with broker_session(settings) as live:
            probe = make_consumer(live.kafka, group_id=None)
            try:
                async with asyncio.timeout(_BROKER_S):
                    await probe.start()
                    return {
                        t: await end_offsets(probe, t) for t in [*topics.sources, topics.changes]
                    }
            finally:
                await probe.stop()
    except Exception as exc:  # the broker is optional here: the database has the runs
        logger.warning("broker not reachable, backlogs left out: %s", exc)
        return None
