"""One way for the contract tests to run a body against a fresh engine on a test database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from khala_stream.db import create_engine, init_db

T = TypeVar("T")


def run_on(
    db_url: str,
    body: Callable[[AsyncEngine], Awaitable[T]],
    *,
    schema: bool = True,
    laravel: bool = True,
) -> T:
    """`body(engine)` on `db_url`, after `init_db` (unless `schema` is False); the engine is
    disposed of afterwards."""

    async def main() -> T:
        engine = create_engine(db_url)
        try:
            if schema:
                await init_db(engine, laravel=laravel)
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())
