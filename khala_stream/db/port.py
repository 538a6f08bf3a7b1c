"""The database as a port: every unit of work runs through `Database.run`, which waits out an
outage (capped exponential backoff, `runtime.with_retries`) for up to `deadline_s` and then
gives up with RuntimeFailure (exit 1). Work is written as a function of the engine, so that a
retry starts it again from the beginning: each unit is one transaction, or only reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db.engine import create_engine, init_db
from khala_stream.runtime import with_retries

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Database:
    engine: AsyncEngine
    deadline_s: float = 120.0

    async def run(
        self,
        work: Callable[Concatenate[AsyncEngine, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`work(engine, *args, **kwargs)`, retried while the database is unreachable."""
        return await with_retries(
            lambda: work(self.engine, *args, **kwargs),
            what="the database",
            deadline_s=self.deadline_s,
        )


@contextlib.asynccontextmanager
async def open_database(
    url: str, *, deadline_s: float, laravel: bool = True
) -> AsyncIterator[Database]:
    """A Database on `url` whose missing tables are created first (waiting for it to be
    reachable); its connections are closed on the way out."""
    engine = create_engine(url)
    try:
        database = Database(engine, deadline_s)
        await database.run(init_db, laravel=laravel)
        yield database
    finally:
        await engine.dispose()
