"""Holding a producer back while the consumers it feeds fall behind.

noida-db, the embedded broker, ignores the fetch byte limits and hands a consumer every record
available, so a consumer that falls behind fetches its whole backlog at once: its memory then
grows with the export instead of staying flat. So the stage that feeds it waits while the
consumer group's stored positions (in the database, moved with each applied batch) are more
than `limit` messages behind what was acknowledged to it.

A consumer that makes no progress for `patience_s` is taken to be absent (`publish` before
`process`, or `process --until-idle` before `sink`, are supported orders): from then on this
producer no longer waits. Its reads of the positions wait out database outages like every other
database call of the stage (`deadline_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.port import Database
from khala_stream.import_runs import stored_positions

logger = logging.getLogger(__name__)


class Backpressure:
    def __init__(
        self,
        engine: AsyncEngine,
        group: str,
        *,
        limit: int,
        patience_s: float = 5.0,
        poll_s: float = 0.01,
        deadline_s: float = 300.0,
    ) -> None:
        self._db = Database(engine, deadline_s)
        self._group = group
        self._limit = limit
        self._patience_s = patience_s
        self._poll_s = poll_s
        self.gave_up = False

    async def wait(self, topic: str, acknowledged: Mapping[int, int]) -> None:
        """Return once `group` is at most `limit` messages behind `acknowledged` on `topic`
        (partition -> end offset acknowledged by the broker)."""
        last: dict[int, int] | None = None
        since = time.monotonic()
        while not self.gave_up:
            positions = await self._db.run(stored_positions, self._group, topic)
            behind = sum(max(0, end - positions.get(p, 0)) for p, end in acknowledged.items())
            if behind <= self._limit:
                return
            now = time.monotonic()
            if positions != last:
                last, since = positions, now
            elif now - since >= self._patience_s:
                self.gave_up = True
                logger.info(
                    "%s made no progress on %s for %.0fs; no longer waiting for it",
                    self._group,
                    topic,
                    self._patience_s,
                )
                return
            await asyncio.sleep(self._poll_s)
