"""How the contract tests run a body against a fresh engine on a test database, and read the
plans PostgreSQL chooses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
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


async def explained(
    engine: AsyncEngine, query: str | sa.TextClause, params: Mapping[str, Any] | None = None
) -> str:
    """PostgreSQL's plan for `query` (with `params`), as EXPLAIN prints it."""
    text = query if isinstance(query, str) else str(query.text)
    async with engine.connect() as conn:
        plan = await conn.execute(sa.text(f"EXPLAIN {text}"), dict(params or {}))
        return "\n".join(row[0] for row in plan)
